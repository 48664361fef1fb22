"""Mamba: chunked selective scan vs the recurrence, layer vs its definition, decoding, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reslm.models import ModelConfig, build_model
from reslm.models.mamba import Mamba, selective_scan
from tests.models.mixer_checks import (
  check_causal_and_decoding,
  check_left_padding,
  check_one_line_error,
  check_state_size_is_constant,
  decode,
  first_block,
  normal,
  randomize,
)

B, T, E, N = 2, 11, 6, 3  # T = 11 is not a multiple of the chunk size 4.
# One layer: its stacked parameters then share shapes (and init compiles) with the one-group hybrid.
TINY = dict(vocab_size=37, d_model=32, num_layers=1, num_heads=4, max_seq_len=32)
OPTIONS = {"d_state": 4, "chunk_size": 4}


def scan_inputs(t=T, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  u, delta = f(B, t, E), np.logaddexp(0.0, f(B, t, E))  # Δ = softplus(.)
  a = -np.exp(f(E, N))
  return u, delta, a, f(B, t, N), f(B, t, N), f(E), f(B, E, N)


def naive_scan(u, delta, a, b, c, d, h0):
  """h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t, y_t = h_t C_t + D u_t, one token at a time."""

  def step(h, xs):
    ut, dt, bt, ct = xs  # [b, E], [b, E], [b, N], [b, N]
    h = jnp.exp(dt[..., None] * a) * h + (dt * ut)[..., None] * bt[:, None, :]
    return h, jnp.einsum("ben,bn->be", h, ct) + d * ut

  h, y = jax.lax.scan(step, h0, tuple(x.swapaxes(0, 1) for x in (u, delta, b, c)))
  return y.swapaxes(0, 1), h


def test_chunked_scan_matches_recurrence_forward_and_gradients():
  args = scan_inputs()
  chunked = lambda *a: selective_scan(*a[:-1], chunk_size=4, state=a[-1])

  @jax.jit
  def both(args):
    results = []
    for fn in (chunked, naive_scan):
      out, vjp = jax.vjp(fn, *args)
      cts = jax.tree.map(lambda o: jnp.sin(jnp.arange(o.size, dtype=o.dtype)).reshape(o.shape), out)
      results.append((out, vjp(cts)))
    return results

  (out, grads), (ref, ref_grads) = both(args)
  for x, y in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((ref, ref_grads)), strict=True):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)


def naive_mamba(m: Mamba, x):
  """The layer written from its definition: explicit conv taps and a per-token recurrence."""
  p = lambda v: v[...]
  xi, z = x @ p(m.in_x.kernel), x @ p(m.in_z.kernel)  # [b, t, E]
  w, t = p(m.conv_w), x.shape[1]
  taps = [
    sum(w[j] * xi[:, s - (m.d_conv - 1) + j] for j in range(m.d_conv) if s - m.d_conv + 1 + j >= 0)
    for s in range(t)
  ]
  u = jax.nn.silu(jnp.stack(taps, 1) + p(m.conv_b))
  rank, proj = p(m.dt_w).shape[0], u @ p(m.x_proj.kernel)  # [Δ low rank | B | C]
  delta = jax.nn.softplus(proj[..., :rank] @ p(m.dt_w) + p(m.dt_b))
  bm, cm = proj[..., rank : rank + m.d_state], proj[..., rank + m.d_state :]
  a = -jnp.exp(p(m.a_log))
  h, ys = jnp.zeros((x.shape[0], m.d_inner, m.d_state)), []
  for s in range(t):
    h = jnp.exp(delta[:, s, :, None] * a) * h + (delta[:, s] * u[:, s])[..., None] * bm[:, s, None]
    ys.append(jnp.sum(h * cm[:, s, None], -1) + p(m.d) * u[:, s])
  return (jnp.stack(ys, 1) * jax.nn.silu(z)) @ p(m.out.kernel)


def tiny(mixer="mamba", options=None, **kw):
  return ModelConfig(**{**TINY, "mixer": mixer, "mixer_options": options or OPTIONS, **kw})


@pytest.fixture(scope="module")
def model():
  return randomize(build_model(tiny()), 0.1)


def test_causal_and_decoding_equals_full_forward(model):
  # From an empty state token by token, and after a prompt of 6 (not a multiple of the chunk).
  check_causal_and_decoding(model, prefills=(1, 6))


def test_hybrid_builds_runs_and_decodes():
  model = randomize(build_model(tiny("mamba,dense", {"mamba": OPTIONS}, num_layers=2)), 0.1)
  kinds = [type(b.mixer).__name__ for b in model.layers.groups.blocks]
  assert kinds == ["Mamba", "DenseAttention"], kinds
  check_causal_and_decoding(model, prefills=(6,))


def test_left_padding_is_invisible_in_forward_and_prefill(model):
  both, seg, out = check_left_padding(model)
  cache = model.init_cache(batch=2, max_len=20)
  pre, cache = decode(model, both[:, :8], cache, jnp.int32(0), seg[:, :8])  # Prefill ends in x.
  np.testing.assert_allclose(pre, out[:, :8], atol=2e-5, rtol=1e-5)
  step, _ = decode(model, both[:, 8:9], cache, jnp.int32(8))
  np.testing.assert_allclose(step[:, 0], out[:, 8], atol=2e-5, rtol=1e-5)


def test_layer_matches_definition_and_gradients_reach_every_parameter(model):
  """The layer vs `naive_mamba`; the scan's gradients are checked against the recurrence above."""
  m = randomize(first_block(model).mixer, 0.3)
  x = normal((B, T, m.out.kernel.shape[1]), seed=1)
  layer = lambda m: m(x, positions_bt=jnp.zeros((B, T), jnp.int32))[0]
  out, grads = nnx.jit(lambda m: (layer(m), nnx.grad(lambda m: jnp.sum(layer(m) ** 2))(m)))(m)
  np.testing.assert_allclose(out, nnx.jit(naive_mamba)(m, x), atol=2e-5, rtol=1e-4)
  for path, g in jax.tree.leaves_with_path(nnx.state(grads, nnx.Param)):
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, path


def test_state_is_constant_size_and_scan_memory_is_one_chunk(model):
  check_state_size_is_constant(model)
  # The forward never materialises the [T, E, N] state history, only one chunk of it.
  t, e, n = 4096, 32, 16

  def fwd(u, delta, b, c):
    return selective_scan(u, delta, -jnp.ones((e, n)), b, c, jnp.ones(e), chunk_size=64)[0]

  xe, xn = (
    jax.ShapeDtypeStruct((1, t, e), jnp.float32),
    jax.ShapeDtypeStruct((1, t, n), jnp.float32),
  )
  temp = jax.jit(fwd).lower(xe, xe, xn, xn).compile().memory_analysis().temp_size_in_bytes
  assert temp < t * e * n * 4 / 4, (temp, t * e * n * 4)


@pytest.mark.parametrize(
  ("options", "match"),
  [
    ({"d_state": 0}, r"model.mixer_options.d_state=0 is not allowed for mamba: an integer >= 1"),
    ({"chunk_size": 0}, r"model.mixer_options.chunk_size=0 is not allowed for mamba"),
    ({"expand": 1.5}, r"model.mixer_options.expand=1.5 is not allowed for mamba"),
    ({"d_conv": 0}, r"model.mixer_options.d_conv=0 is not allowed for mamba"),
    ({"dt_rank": -1}, r"model.mixer_options.dt_rank=-1 is not allowed for mamba"),
    ({"dt_min": 0.0}, r"model.mixer_options.dt_min=0.0 is not allowed for mamba: a number > 0"),
    ({"dt_min": 0.5, "dt_max": 0.1}, r"model.mixer_options.dt_min=0.5 .*at most dt_max=0.1"),
    ({"dstate": 4}, r"model.mixer_options.dstate is not a setting of sequence mixer 'mamba'"),
    ({"mamba": {"chunk": 4}}, r"model.mixer_options.mamba.chunk is not a setting of .*'mamba'"),
  ],
)
def test_bad_settings_raise_one_line_errors(options, match):
  check_one_line_error(lambda: build_model(tiny(options=options)), match)


def test_encoder_is_rejected():
  check_one_line_error(lambda: build_model(tiny(kind="encoder")), r"model.mixer='mamba' is causal")

"""RWKV-6: chunked WKV vs the recurrence, stability, layer vs definition, decoding, channel-mix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reslm.models import ModelConfig, build_model
from reslm.models.rwkv import GROUP_NORM_EPS, RWKV6TimeMix, chunked_wkv
from tests.models.mixer_checks import (
  check_causal_and_decoding,
  check_left_padding,
  check_one_line_error,
  check_state_size_is_constant,
  first_block,
  normal,
  randomize,
)

B, T, H, K = 2, 11, 2, 3  # T = 11 is not a multiple of the chunk size 4.
# One layer: its stacked parameters then share shapes (and init compiles) with the one-group hybrid.
TINY = dict(vocab_size=37, d_model=32, num_layers=1, num_heads=4, max_seq_len=32)
OPTIONS = {"chunk_size": 4, "mix_lora": 4, "decay_lora": 8}


def naive_wkv(r, k, v, w, u, s0):
  """o_t = r_t (S_{t-1} + diag(u) k_tᵀ v_t), S_t = diag(w_t) S_{t-1} + k_tᵀ v_t, token by token."""

  def step(s, xs):
    rt, kt, vt, wt = xs  # [b, H, K]
    kv = kt[..., :, None] * vt[..., None, :]  # [b, H, K, K]
    out = jnp.einsum("bhi,bhij->bhj", rt, s + u[..., None] * kv)
    return wt[..., None] * s + kv, out

  s, out = jax.lax.scan(step, s0, tuple(x.swapaxes(0, 1) for x in (r, k, v, w)))
  return out.swapaxes(0, 1), s


def wkv_inputs(t, seed=0, decay_shift=0.0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  r, k, v = f(B, t, H, K), f(B, t, H, K), f(B, t, H, K)
  log_w = -np.exp(f(B, t, H, K) + decay_shift)
  return r, k, v, log_w, f(H, K), f(B, H, K, K)


def check_wkv(t, chunk_size, decay_shift, atol):
  """Outputs, final state and input cotangents of the chunked form vs `naive_wkv`."""
  args = wkv_inputs(t, decay_shift=decay_shift)
  chunked = lambda r, k, v, lw, u, s0: chunked_wkv(r, k, v, lw, u, chunk_size=chunk_size, state=s0)
  naive = lambda r, k, v, lw, u, s0: naive_wkv(r, k, v, jnp.exp(lw), u, s0)

  @jax.jit
  def both(args):
    results = []
    for fn in (chunked, naive):
      out, vjp = jax.vjp(fn, *args)
      cts = jax.tree.map(lambda o: jnp.sin(jnp.arange(o.size, dtype=o.dtype)).reshape(o.shape), out)
      results.append((out, vjp(cts)))
    return results

  (out, grads), (ref, ref_grads) = both(args)
  # log w's cotangent is left out where the chunked form clamps it (its gradient is 0 there).
  grads, ref_grads = list(grads), list(ref_grads)
  grads[3] = jnp.where(args[3] < -20.0, 0.0, grads[3])
  ref_grads[3] = jnp.where(args[3] < -20.0, 0.0, ref_grads[3])
  for x, y in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((ref, ref_grads)), strict=True):
    assert np.isfinite(np.asarray(x)).all()
    scale = float(np.abs(np.asarray(y)).max())
    np.testing.assert_allclose(x, y, atol=atol * max(scale, 1.0), rtol=1e-4)


def test_chunked_wkv_matches_recurrence_forward_and_gradients():
  check_wkv(T, chunk_size=4, decay_shift=0.0, atol=2e-5)


def test_strong_decay_is_stable_and_matches_recurrence():
  """T = 256 in chunks of 32 with per-step log-decays down to about -e^7 (mostly clamped).

  The tolerance (2e-6 of the output scale) fails a form that takes decay exponents as differences
  of in-chunk prefix sums (error ~1e-4 here): they lose float32 precision when decays are strong.
  """
  check_wkv(256, chunk_size=32, decay_shift=4.0, atol=2e-6)


def naive_time_mix(m: RWKV6TimeMix, x):
  """The time-mix written from its definition (RWKV-6 ddlerp, decay LoRA, WKV, GroupNorm, gate)."""
  p = lambda v: v[...]
  b, t, d = x.shape
  h, kd = m.num_heads, m.head_dim
  dx = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1] - x  # x_{t-1} - x_t, x_{-1} = 0
  lora = jnp.tanh(jnp.einsum("btd,dfr->btfr", x + dx * p(m.maa_x), p(m.maa_a)))
  xs = {}
  for i, name in enumerate("wkvrg"):
    xs[name] = x + dx * (p(m.maa)[i] + lora[:, :, i] @ p(m.maa_b)[i])
  proj = lambda name, lin: (xs[name] @ p(lin.kernel).reshape(d, -1)).reshape(b, t, h, kd)
  r, k, v, g = proj("r", m.r), proj("k", m.k), proj("v", m.v), proj("g", m.g)
  dt = p(m.decay) + jnp.einsum("btr,rhk->bthk", jnp.tanh(xs["w"] @ p(m.decay_a)), p(m.decay_b))
  w = jnp.exp(-jnp.exp(dt))
  o, _ = naive_wkv(r, k, v, w, p(m.bonus), jnp.zeros((b, h, kd, kd)))
  mean, var = o.mean(-1, keepdims=True), o.var(-1, keepdims=True)
  o = (o - mean) / jnp.sqrt(var + GROUP_NORM_EPS) * p(m.ln_scale) + p(m.ln_bias)
  return (o * jax.nn.silu(g)).reshape(b, t, d) @ p(m.o.kernel).reshape(d, d)


def tiny(mlp="swiglu", options=None, **kw):
  return ModelConfig(
    **{**TINY, "mixer": "rwkv", "mixer_options": options or OPTIONS, "mlp": mlp, **kw}
  )


@pytest.fixture(scope="module")
def model():
  return randomize(build_model(tiny()), 0.1)


def run_mixer(m, x):
  return m(x, positions_bt=jnp.zeros(x.shape[:2], jnp.int32))[0]


def test_layer_matches_definition_and_gradients_reach_every_parameter(model):
  m = randomize(first_block(model).mixer, 0.3)
  x = normal((B, T, m.d_model), seed=1)
  out, grads = nnx.jit(
    lambda m: (run_mixer(m, x), nnx.grad(lambda m: jnp.sum(run_mixer(m, x) ** 2))(m))
  )(m)
  np.testing.assert_allclose(out, nnx.jit(naive_time_mix)(m, x), atol=2e-5, rtol=1e-4)
  for path, g in jax.tree.leaves_with_path(nnx.state(grads, nnx.Param)):
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, path


def test_layer_with_strong_decay_over_256_tokens_is_finite_and_exact(model):
  m = randomize(first_block(model).mixer, 0.3, seed=1)
  m.decay[...] = jnp.asarray(
    np.asarray(m.decay[...]) + 6.0
  )  # log w = -exp(d) from about -1 to -e^5: often clamped.
  m.chunk_size = 32
  x = normal((1, 256, m.d_model), seed=2)
  out = nnx.jit(run_mixer)(m, x)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out, nnx.jit(naive_time_mix)(m, x), atol=2e-5, rtol=1e-4)


def test_causal_and_decoding_equals_full_forward(model):
  # From an empty state token by token, and after a prompt of 6 (not a multiple of the chunk).
  check_causal_and_decoding(model, prefills=(1, 6))
  check_state_size_is_constant(model)


def test_left_padding_is_invisible(model):
  check_left_padding(model)


def test_channel_mix_matches_definition_and_decodes_exactly():
  """rwkv_cmix against its definition on a whole sequence, then inside a model: cached decoding
  (token by token and after a prompt) equals the full forward, because the block hands the MLP its
  shift state (before the MLP had no cache, every step saw a zero previous token)."""
  model = randomize(build_model(tiny(mlp="rwkv_cmix")), 0.1)
  cmix = first_block(model).mlp
  assert cmix.decode_inexact is None
  x = normal((B, T, 32), seed=3)
  p = lambda v: np.asarray(v[...])
  dx = np.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1] - x  # x_{t-1} - x_t, x_{-1} = 0
  key = np.square(np.maximum((x + dx * p(cmix.maa)[0]) @ p(cmix.key.kernel), 0.0))
  ref = (key @ p(cmix.value.kernel)) / (
    1.0 + np.exp(-(x + dx * p(cmix.maa)[1]) @ p(cmix.receptance.kernel))
  )
  np.testing.assert_allclose(nnx.jit(lambda m: m(x))(cmix), ref, atol=2e-5, rtol=1e-4)
  # Split at 4: the second call's shift continues from the cached last input of the first.
  cache = cmix.init_cache(B)
  first, cache = nnx.jit(lambda m, c: m(x[:, :4], cache=c))(cmix, cache)
  second, _ = nnx.jit(lambda m, c: m(x[:, 4:], cache=c))(cmix, cache)
  np.testing.assert_allclose(np.concatenate([first, second], 1), ref, atol=2e-5, rtol=1e-4)
  check_causal_and_decoding(model, prefills=(1, 6))


@pytest.mark.parametrize(
  ("kw", "match"),
  [
    (dict(options={"chunk_size": 0}), r"model.mixer_options.chunk_size=0 is not allowed for rwkv"),
    (dict(options={"mix_lora": 0}), r"model.mixer_options.mix_lora=0 is not allowed for rwkv"),
    (dict(options={"decay_lora": 2.0}), r"model.mixer_options.decay_lora=2.0 is not allowed"),
    (dict(options={"chunk": 8}), r"model.mixer_options.chunk is not a setting of .*'rwkv'"),
    (dict(head_dim=16), r"rwkv needs d_model == num_heads \* head_dim; got d_model=32"),
    (dict(kind="encoder"), r"model.mixer='rwkv' is causal only"),
  ],
)
def test_bad_settings_raise_one_line_errors(kw, match):
  check_one_line_error(lambda: build_model(tiny(**kw)), match)

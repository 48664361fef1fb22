"""Hyena: FFT vs direct convolution, the order-N recurrence, filter decay, causality, decoding."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reslm.models.hyena  # noqa: F401  (registers "hyena")
from reslm.models import ModelConfig, build_model
from reslm.models.hyena import Hyena, fft_conv
from reslm.models.longconv import DECAY_REACH, DECAY_TARGET
from tests.models.mixer_checks import (
  check_causal_and_decoding,
  check_one_line_error,
  check_too_long_raises,
  randomised,
)

B, T, D = 2, 11, 8
TINY = dict(vocab_size=37, d_model=16, num_layers=1, num_heads=2, max_seq_len=24, mixer="hyena")


def toeplitz(h_fwd, h_bwd=None):
  """[t, s, d]: h_fwd[t - s] for s <= t, h_bwd[s - t] above the diagonal (or 0)."""
  t = h_fwd.shape[0]
  lag = np.arange(t)[:, None] - np.arange(t)[None, :]
  mat = jnp.where((lag >= 0)[..., None], h_fwd[np.clip(lag, 0, None)], 0.0)
  if h_bwd is not None:
    mat = mat + jnp.where((lag < 0)[..., None], h_bwd[np.clip(-lag, 0, None)], 0.0)
  return mat


def naive_conv(z, h_fwd, h_bwd=None):
  return jnp.einsum("tsd,bsd->btd", toeplitz(h_fwd, h_bwd), z)


def naive_short_conv(u, w, b):
  """y_t = b + Σ_j w_j u_{t-j}, an explicit loop over positions and taps."""
  out = []
  for t in range(u.shape[1]):
    out.append(b + sum(w[j] * u[:, t - j] for j in range(w.shape[0]) if t - j >= 0))
  return jnp.stack(out, axis=1)


def naive_hyena(mod: Hyena, x):
  """The Hyena operator from its definition, with the module's parameters and filters."""
  p = lambda v: v[...]  # noqa: E731
  u = jnp.einsum("btd,dne->btne", x, p(mod.in_proj.kernel)) + p(mod.in_proj.bias)
  u = naive_short_conv(u, p(mod.short_conv.weight), p(mod.short_conv.bias))
  h_fwd, h_bwd = mod.filter(x.shape[1])
  z = u[:, :, -1]
  for n in range(mod.order):
    hb = None if h_bwd is None else h_bwd[:, n]
    z = u[:, :, n] * (naive_conv(z, h_fwd[:, n], hb) + p(mod.skip)[n] * z)
  return z @ p(mod.out_proj.kernel) + p(mod.out_proj.bias)


def check_conv(conv, two_sided, atol):
  """conv(z, h, h_bwd) equals the Toeplitz product: outputs and gradients (one jit)."""
  keys = jax.random.split(jax.random.key(0), 4)
  args = [jax.random.normal(keys[0], (B, T, D)), jax.random.normal(keys[1], (T, D))]
  args += [jax.random.normal(keys[2], (T, D))] if two_sided else []
  ct = jax.random.normal(keys[3], (B, T, D))

  @jax.jit
  def both(args):
    return [jax.vjp(f, *args) for f in (conv, naive_conv)]

  (out, f_vjp), (ref, ref_vjp) = both(args)
  np.testing.assert_allclose(out, ref, atol=atol, rtol=1e-5)
  for g, e in zip(f_vjp(ct), ref_vjp(ct), strict=True):
    np.testing.assert_allclose(g, e, atol=2 * atol, rtol=1e-5)


@pytest.mark.parametrize("two_sided", [False, True])
def test_fft_conv_matches_toeplitz_forward_and_gradients(two_sided):
  check_conv(fft_conv, two_sided, atol=2e-5)


@functools.cache
def operator(order: int, causal: bool) -> Hyena:
  return randomised(
    lambda: Hyena(D, max_seq_len=16, order=order, causal=causal, rngs=nnx.Rngs(0)), seed=order
  )


@nnx.jit
def apply(mod, x, segment_ids=None):
  out, cache = mod(x, positions_bt=None, segment_ids_bt=segment_ids)
  assert cache is None
  return out


@pytest.mark.parametrize(("order", "causal"), [(1, True), (3, True), (2, False)])
def test_operator_matches_naive_recurrence(order, causal):
  mod = operator(order, causal)
  x = jax.random.normal(jax.random.key(3), (B, T, D))
  expected = nnx.jit(naive_hyena)(mod, x)
  scale = float(jnp.abs(expected).max())
  np.testing.assert_allclose(apply(mod, x), expected, atol=2e-5 * scale, rtol=1e-4)


def test_encoder_is_two_sided_and_ignores_padding():
  mod = operator(2, False)
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  full = apply(mod, x)
  assert not np.allclose(apply(mod, x.at[:, 9].add(1.0))[:, :9], full[:, :9])  # Sees the future.
  seg = jnp.array([[1] * T, [1] * 7 + [0] * (T - 7)])
  padded = apply(mod, x, seg)
  np.testing.assert_allclose(padded[0], full[0], atol=1e-6, rtol=0)
  alone = apply(mod, x[1:, :7])
  np.testing.assert_allclose(padded[1, :7], alone[0], atol=2e-5, rtol=1e-5)


def test_gradients_are_finite_and_reach_every_parameter():
  mod = operator(3, True)
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  ct = jax.random.normal(jax.random.key(2), (B, T, D))
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, positions_bt=None)[0] * ct)))(mod)
  for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
    assert np.isfinite(np.asarray(g)).all(), path
    assert np.abs(np.asarray(g)).max() > 0, path


def test_long_filter_decays_per_channel_window():
  """h_n(t) / FFN(PE(t)) = exp(-α_c t/L), reaching DECAY_TARGET at t = reach_c · L."""
  length = 32
  mod = Hyena(D, max_seq_len=length, order=2, rngs=nnx.Rngs(0))  # The real initialisers.
  h, _ = mod.filter(length)  # [L, N, D]
  raw = mod.filter.ffn(length)[:, 0]  # [L, N, D]
  reach = np.linspace(*DECAY_REACH, D)  # Fastest channel first.
  t = np.arange(length)[:, None]
  window = DECAY_TARGET ** (t / (reach[None] * length))  # [L, D]
  np.testing.assert_allclose(h, raw * window[:, None], atol=1e-6, rtol=1e-5)
  # Beyond 0.3 L the fastest channel is at most DECAY_TARGET times its unwindowed FFN value.
  late = int(math.ceil(DECAY_REACH[0] * length))
  assert np.all(np.abs(h[late:, :, 0]) <= DECAY_TARGET * np.abs(raw[late:, :, 0]) + 1e-7)
  assert np.abs(h[late:, :, 0]).max() < np.abs(h[:4, :, 0]).max()


def tiny(**kw):
  return ModelConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def model():
  return randomised(lambda: build_model(tiny()))


def test_causal_and_cached_decoding_equal_full_forward(model):
  check_causal_and_decoding(model, prefills=(5,))


def test_too_long_sequences_raise(model):
  check_too_long_raises(model, max_seq_len=24)


@pytest.mark.parametrize(
  ("options", "match"),
  [
    ({"order": 0}, r"model.mixer_options.order=0 .*integer >= 1"),
    ({"filter_hidden": -1}, r"model.mixer_options.filter_hidden=-1 .*integer >= 1"),
    ({"emb_dim": 16}, r"model.mixer_options.emb_dim=16 .*odd integer >= 3"),
    ({"filter_freq": 0.0}, r"model.mixer_options.filter_freq=0.0 .*positive number"),
    ({"hyena": {"ordr": 2}}, r"model.mixer_options.hyena.ordr is not a setting of .*'hyena'"),
  ],
)
def test_bad_options_raise_one_line_errors(options, match):
  check_one_line_error(lambda: build_model(tiny(mixer_options=options)), match)

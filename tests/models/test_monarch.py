"""Monarch Mixer: Monarch products vs dense matrices, the Monarch DFT, the causal convolution,
the mixer against its definition, causality and cached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reslm.models.monarch  # noqa: F401  (registers "monarch")
from reslm.models import ModelConfig, build_model
from reslm.models.monarch import (
  MonarchMixer,
  dft_factors,
  fft_size,
  monarch_conv,
  monarch_dense,
  monarch_dft,
  monarch_matmul,
  transpose_permutation,
)
from tests.models.mixer_checks import (
  check_causal_and_decoding,
  check_one_line_error,
  check_too_long_raises,
  randomised,
)
from tests.models.test_hyena import (
  check_conv,
  naive_conv,
  naive_short_conv,
)

B, T, D = 2, 11, 8
TINY = dict(vocab_size=37, d_model=16, num_layers=1, num_heads=2, max_seq_len=24, mixer="monarch")


def normal(seed, shape, complex_=False):
  x = jax.random.normal(jax.random.key(seed), shape)
  return x + 1j * jax.random.normal(jax.random.key(seed + 100), shape) if complex_ else x


def test_transpose_permutation_is_reshape_transpose():
  x = np.arange(12.0)
  np.testing.assert_array_equal(transpose_permutation(3, 4) @ x, x.reshape(3, 4).T.ravel())


@pytest.mark.parametrize(("b", "m", "complex_"), [(4, 8, False), (3, 3, True)])
def test_monarch_matmul_equals_dense_matrix(b, m, complex_):
  r, l_blocks = normal(0, (b, m, m), complex_), normal(1, (m, b, b), complex_)
  x = normal(2, (3, 2, b * m), complex_)

  @jax.jit
  def both(x, r, l_blocks):
    dense = monarch_dense(r, l_blocks)  # [n, n]
    return monarch_matmul(x, r, l_blocks), jnp.einsum("nk,...k->...n", dense, x)

  np.testing.assert_allclose(*both(x, r, l_blocks), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [2, 9, 32])
def test_monarch_dft_equals_fft(n):
  x = normal(3, (2, 3, n), complex_=True)
  scale = np.sqrt(n)  # Entries of the DFT grow like √n.
  np.testing.assert_allclose(
    jax.jit(monarch_dft)(x), np.fft.fft(np.asarray(x)), atol=2e-6 * scale * n, rtol=1e-5
  )
  # As a matrix: DFT_n = (P L Pᵀ R) Q with Q the input reshape-transpose.
  n1, r, l_blocks = dft_factors(n)
  q = transpose_permutation(n1, n // n1)
  dft = np.exp(-2j * np.pi * np.outer(np.arange(n), np.arange(n)) / n)
  np.testing.assert_allclose(jax.jit(monarch_dense)(r, l_blocks) @ q, dft, atol=1e-5)


def test_fft_size_is_the_smallest_supported_length():
  supported = sorted({b * b for b in range(1, 20)} | {2 * b * b for b in range(1, 20)})
  for t in range(1, 100):
    assert fft_size(t) == min(n for n in supported if n >= 2 * t), t
  with pytest.raises(ValueError, match="monarch DFT size 12 is not supported"):
    dft_factors(12)


@pytest.mark.parametrize("two_sided", [False, True])
def test_monarch_conv_matches_direct_convolution_and_gradients(two_sided):
  check_conv(monarch_conv, two_sided, atol=5e-5)


def naive_mixer(mod: MonarchMixer, x, segment_ids=None):
  """The mixer from its definition, with dense Monarch matrices and a Toeplitz convolution."""
  p = lambda v: v[...]  # noqa: E731

  def project(lin, x):
    return x @ monarch_dense(p(lin.r), p(lin.l)).T + p(lin.bias)

  u = jnp.stack([project(lin, x) for lin in (mod.gate_in, mod.gate_out, mod.value)], axis=2)
  if segment_ids is not None:
    u = u * (segment_ids != 0)[:, :, None, None]
  u = naive_short_conv(u, p(mod.short_conv.weight), p(mod.short_conv.bias))
  z = u[:, :, 0] * u[:, :, 2]
  if segment_ids is not None:
    z = z * (segment_ids != 0)[:, :, None]
  k_fwd, k_bwd = mod.kernels(x.shape[1])
  y = naive_conv(z, k_fwd, k_bwd) + p(mod.skip) * z
  return project(mod.out_proj, u[:, :, 1] * y)


def mixer(causal: bool) -> MonarchMixer:
  return randomised(
    lambda: MonarchMixer(D, max_seq_len=16, nblocks=2, causal=causal, rngs=nnx.Rngs(0)), seed=1
  )


@nnx.jit
def apply(mod, x, segment_ids=None):
  out, cache = mod(x, positions_bt=None, segment_ids_bt=segment_ids)
  assert cache is None
  return out


@pytest.mark.parametrize("causal", [True, False])
def test_mixer_matches_definition(causal):
  mod = mixer(causal)
  x = normal(8, (B, T, D))
  expected = nnx.jit(naive_mixer)(mod, x)
  scale = float(jnp.abs(expected).max())
  np.testing.assert_allclose(apply(mod, x), expected, atol=2e-5 * scale, rtol=1e-4)
  if not causal:  # Right padding changes nothing in the real tokens; later tokens are seen.
    seg = jnp.array([[1] * T, [1] * 7 + [0] * (T - 7)])
    padded = apply(mod, x, seg)
    np.testing.assert_allclose(
      padded, nnx.jit(naive_mixer)(mod, x, seg), atol=2e-5 * scale, rtol=1e-4
    )
    alone = apply(mod, x[1:, :7])
    np.testing.assert_allclose(padded[1, :7], alone[0], atol=2e-5 * scale, rtol=1e-4)
    assert not np.allclose(apply(mod, x.at[:, 9].add(1.0))[:, :9], expected[:, :9])


def test_real_init_kernel_window_and_projection_scale():
  """The kernel is the parameter times the decay window; the Monarch projections' entries have
  the dense initialiser's variance (each entry of P L Pᵀ R is one product l·r)."""
  d, std = 64, 0.05
  mod = MonarchMixer(d, max_seq_len=16, nblocks=4, init_std=std, rngs=nnx.Rngs(0))
  k, _ = mod.kernels(16)
  reach = np.linspace(0.3, 1.5, d)
  window = 1e-2 ** (np.arange(16)[:, None] / (reach[None] * 16))
  np.testing.assert_allclose(k, mod.kernel[...][0] * window, atol=1e-6, rtol=1e-5)
  dense = monarch_dense(mod.gate_in.r[...], mod.gate_in.l[...])
  assert abs(float(jnp.std(dense)) / std - 1) < 0.15


def test_gradients_are_finite_and_reach_every_parameter():
  mod = mixer(True)
  x, ct = normal(9, (B, T, D)), normal(10, (B, T, D))
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, positions_bt=None)[0] * ct)))(mod)
  for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
    assert np.isfinite(np.asarray(g)).all(), path
    if path[0].key == "kernel":  # Lags >= T cannot matter.
      g = g[:, :T]
    assert np.abs(np.asarray(g)).max() > 0, path


@pytest.fixture(scope="module")
def model():
  return randomised(lambda: build_model(ModelConfig(**TINY)))


def test_causal_and_cached_decoding_equal_full_forward(model):
  check_causal_and_decoding(model, prefills=(5,))


def test_too_long_sequences_raise(model):
  check_too_long_raises(model, max_seq_len=24)


@pytest.mark.parametrize(
  ("options", "match"),
  [
    ({"nblocks": 3}, r"model.mixer_options.nblocks=3 .*divide model.d_model=16; .*1, 2, 4, 8, 16"),
    ({"nblocks": 0}, r"model.mixer_options.nblocks=0 .*must divide model.d_model=16"),
    ({"monarch": {"blocks": 2}}, r"model.mixer_options.monarch.blocks is not a setting of .*'mon"),
  ],
)
def test_bad_options_raise_one_line_errors(options, match):
  check_one_line_error(
    lambda: build_model(ModelConfig(**{**TINY, "mixer_options": options})), match
  )

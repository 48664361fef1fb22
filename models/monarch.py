"""Monarch Mixer (M2; Fu et al. 2023, "Monarch Mixer: A Simple Sub-Quadratic GEMM-Based
Architecture"), with Monarch matrices from Dao et al. 2022.

A Monarch matrix of size n = b·m is M = P L Pᵀ R: R block-diagonal with b blocks of m×m, L
block-diagonal with m blocks of b×b, and Pᵀ the permutation that reshapes a vector to [b, m] and
transposes it to [m, b] (P undoes it). Multiplying costs O(n (b + m)) instead of O(n²); for
b = m = √n that is O(n^1.5).

The DFT is a Monarch matrix after an input permutation (Cooley-Tukey with n = n1·n2):
  DFT_n = P L Pᵀ R Q,  Q = reshape [n1, n2] and transpose,
  R = n2 blocks diag(ω_n^{j1·k2}) DFT_n1 (DFT plus twiddles), L = n1 blocks DFT_n2,
so a long convolution is three Monarch products (two DFTs and an inverse) and an elementwise one.

The mixer (a gated long convolution, M2's sequence mixer, with Monarch channel mixing):
  x1, x2, v = Monarch_i(u) + b_i (i = 1..3), each followed by a short causal depthwise conv (width 3)
  z = x1 ⊙ v;  y = k * z + β ⊙ z  (causal long convolution, learned per-channel skip β)
  out = Monarch_out(x2 ⊙ y) + b_out
The kernel is parameterised directly per channel and lag, times the fixed exponential decay window
exp(-α_c t/L) (as regularisation, the same window as Hyena's; L = max_seq_len). The convolution
zero-pads t to an FFT size n >= 2t with n = b·b or n = b·2b (the smallest such n; every length
has one), so nothing wraps around, and evaluates the DFTs as Monarch products in complex64:
O(t^1.5) per channel.

Channel mixing: `nblocks` (default 4) is b for the D×D Monarch projections; it must divide d_model.
Encoder (causal=False): a second kernel gives the negative lags (two-sided convolution).
Segment ids act as a padding mask only; packed sequences are not separated.
Decoding: the cache holds the short convolution's window and z at every past position,
[b, max_len, D] float32; new tokens use the direct causal sum, O(max_len · D) per token.
The kernel is defined on max_seq_len lags: a longer input (or cache) raises a ValueError.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reslm.models.longconv import (
  SHORT_CONV,
  LongConvMixer,
  ShortConv,
  decay_window,
  direct_causal_conv,
  kernel_layout,
)
from reslm.models.registry import MIXERS, check_option, is_int, layer_kwargs, mixer_options
from reslm.models.sharding import param

DEFAULTS = {"nblocks": 4}


def monarch_matmul(x: jax.Array, r_blocks: jax.Array, l_blocks: jax.Array) -> jax.Array:
  """M x for the Monarch matrix M = P L Pᵀ R, over the last axis of x.

  Args:
    x: [..., n] with n = b·m.
    r_blocks: R's b diagonal blocks, [b, m, m] as (block, out, in).
    l_blocks: L's m diagonal blocks, [m, b, b] as (block, out, in).

  Returns:
    [..., n].
  """
  b, m = r_blocks.shape[0], r_blocks.shape[1]
  lead = x.shape[:-1]
  y = jnp.einsum("...ij,ikj->...ik", x.reshape(*lead, b, m), r_blocks)  # R: [.., b, m]
  y = jnp.einsum("...ji,jki->...jk", jnp.swapaxes(y, -1, -2), l_blocks)  # Pᵀ, then L: [.., m, b]
  return jnp.swapaxes(y, -1, -2).reshape(*lead, b * m)  # P


def transpose_permutation(b: int, m: int) -> np.ndarray:
  """Pᵀ as a dense 0/1 matrix [n, n]: (Pᵀ x)[j·b + i] = x[i·m + j]."""
  n = b * m
  out = np.zeros((n, n), np.float32)
  i, j = np.meshgrid(np.arange(b), np.arange(m), indexing="ij")
  out[(j * b + i).ravel(), (i * m + j).ravel()] = 1.0
  return out


def monarch_dense(r_blocks: jax.Array, l_blocks: jax.Array) -> jax.Array:
  """M = P L Pᵀ R as a dense [n, n] matrix, built from explicit block-diagonal and 0/1 factors."""
  b, m = r_blocks.shape[0], r_blocks.shape[1]
  r = jax.scipy.linalg.block_diag(*r_blocks)
  l_mat = jax.scipy.linalg.block_diag(*l_blocks)
  pt = jnp.asarray(transpose_permutation(b, m), r.dtype)
  return pt.T @ l_mat @ pt @ r


def fft_size(length: int) -> int:
  """The smallest n >= 2·length of the form b·b or b·2b (what `monarch_dft` supports)."""
  b = math.isqrt(2 * length - 1) + 1  # b·b >= 2·length; some b' <= b may do with b'·2b'.
  candidates = [k * k for k in (b - 1, b) if k * k >= 2 * length]
  candidates += [2 * k * k for k in range(1, b + 1) if 2 * k * k >= 2 * length]
  return min(candidates)


def dft_factors(n: int) -> tuple[int, np.ndarray, np.ndarray]:
  """(n1, R blocks [n2, n1, n1], L blocks [n1, n2, n2]) with DFT_n = P L Pᵀ R Q, complex64.

  n must be b·b (n1 = n2 = b) or b·2b (n1 = b, n2 = 2b); Q reshapes to [n1, n2] and transposes.
  """
  b = math.isqrt(n)
  if b * b != n:
    b = math.isqrt(n // 2)
    if 2 * b * b != n:
      raise ValueError(f"monarch DFT size {n} is not supported; it must be b*b or b*2b")
  n1, n2 = b, n // b

  def dft(size):
    k = np.arange(size)
    return np.exp(-2j * np.pi * np.outer(k, k) / size)

  twiddle = np.exp(-2j * np.pi * np.outer(np.arange(n1), np.arange(n2)) / n)  # [j1, k2]
  r = twiddle.T[:, :, None] * dft(n1)[None]  # r[k2] = diag(ω_n^{j1 k2}) DFT_n1
  l_blocks = np.broadcast_to(dft(n2), (n1, n2, n2))
  return n1, r.astype(np.complex64), l_blocks.astype(np.complex64)


def monarch_dft(x: jax.Array) -> jax.Array:
  """The DFT over the last axis (size b·b or b·2b) as a permutation and one Monarch product."""
  n = x.shape[-1]
  n1, r, l_blocks = dft_factors(n)
  lead = x.shape[:-1]
  xq = jnp.swapaxes(x.reshape(*lead, n1, n // n1), -1, -2).reshape(*lead, n)  # Q x
  return monarch_matmul(xq.astype(jnp.complex64), jnp.asarray(r), jnp.asarray(l_blocks))


def monarch_idft(x: jax.Array) -> jax.Array:
  """The inverse DFT over the last axis: conj(DFT(conj x)) / n."""
  return jnp.conj(monarch_dft(jnp.conj(x))) / x.shape[-1]


def monarch_conv(z_btd: jax.Array, k_fwd: jax.Array, k_bwd: jax.Array | None = None) -> jax.Array:
  """y_t = Σ_s k(t - s) z_s per channel with Monarch DFTs: causal, or two-sided given k_bwd.

  Args:
    z_btd: Input, [b, t, D].
    k_fwd: Kernel at lags 0..t-1, [t, D].
    k_bwd: Optional kernel at negative lags (entry l is lag -l, entry 0 unused), [t, D].

  Returns:
    [b, t, D] float32.
  """
  t = z_btd.shape[1]
  n = fft_size(t)
  kern = kernel_layout(k_fwd.astype(jnp.float32), k_bwd, n)  # [n, D]
  z = jnp.pad(z_btd.astype(jnp.float32), ((0, 0), (0, n - t), (0, 0)))
  zf = monarch_dft(jnp.swapaxes(z, 1, 2))  # [b, D, n]
  kf = monarch_dft(kern.T)  # [D, n]
  y = jnp.real(monarch_idft(zf * kf[None]))[:, :, :t]
  return jnp.swapaxes(y, 1, 2)


class MonarchLinear(nnx.Module):
  """y = M x + bias for a square Monarch matrix M (see `monarch_matmul`).

  Initialised so that y has the variance of a dense layer with std `init_std`:
  std(R) = init_std · √b and std(L) = 1/√b.

  Args:
    features: n, input and output width.
    nblocks: b, the number of blocks of R (must divide n).
    init_std: Equivalent dense initialiser std.
    dtype: Compute dtype.
    param_dtype: Storage dtype.
    rngs: Random streams.
  """

  def __init__(
    self, features: int, nblocks: int, *, init_std=0.02, dtype=jnp.float32, param_dtype, rngs
  ):
    divisors = ", ".join(str(d) for d in range(1, features + 1) if features % d == 0)
    check_option(
      "monarch",
      "nblocks",
      nblocks,
      is_int(nblocks, 1) and features % nblocks == 0,
      f"it must divide model.d_model={features}; choose one of: {divisors}",
    )
    b, m = nblocks, features // nblocks
    self.dtype = dtype
    normal = lambda std, shape: std * jax.random.normal(rngs.params(), shape, param_dtype)  # noqa: E731
    self.r = param(normal(init_std * b**0.5, (b, m, m)), (None, None, "embed"))
    self.l = param(normal(b**-0.5, (m, b, b)), ("embed", None, None))
    self.bias = param(jnp.zeros((features,), param_dtype), ("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    f = lambda p: p[...].astype(self.dtype)  # noqa: E731
    return monarch_matmul(x.astype(self.dtype), f(self.r), f(self.l)) + f(self.bias)


class MonarchMixer(LongConvMixer):
  """M2's sequence mixer: Monarch projections around a gated Monarch-FFT long convolution.

  Call, decoding and cache as in `LongConvMixer`; the cache's "z" is [b, max_len, D].

  Args:
    d_model: Model width D.
    max_seq_len: Lags the long kernel is defined for.
    nblocks: Blocks of the Monarch projections (must divide d_model).
    causal: Causal (decoder) or two-sided (encoder) long convolution.
    init_std: Equivalent dense initialiser std of the input projections.
    out_init_std: Same, for the output projection.
    dtype: Compute dtype (the long convolution runs in float32 / complex64).
    param_dtype: Storage dtype.
    rngs: Random streams.
  """

  name = "monarch"

  def __init__(
    self,
    d_model: int,
    *,
    max_seq_len: int,
    nblocks: int = 4,
    causal: bool = True,
    init_std: float = 0.02,
    out_init_std: float = 0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.d_model, self.max_seq_len, self.causal, self.dtype = d_model, max_seq_len, causal, dtype
    self.z_shape = (d_model,)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_in = MonarchLinear(d_model, nblocks, init_std=init_std, **kw)
    self.gate_out = MonarchLinear(d_model, nblocks, init_std=init_std, **kw)
    self.value = MonarchLinear(d_model, nblocks, init_std=init_std, **kw)
    self.short_conv = ShortConv((3, d_model), SHORT_CONV, axes=(None, "mlp"), **kw)
    directions = 1 if causal else 2
    # std 1/√L: with the window the convolution keeps the input's scale to within √(1/2α).
    shape = (directions, max_seq_len, d_model)
    kernel = max_seq_len**-0.5 * jax.random.normal(rngs.params(), shape, param_dtype)
    self.kernel = param(kernel, (None, None, "mlp"))
    self.skip = param(jnp.ones((d_model,), param_dtype), ("mlp",))
    self.out_proj = MonarchLinear(d_model, nblocks, init_std=out_init_std, **kw)

  def kernels(self, length: int):
    """(causal kernel [length, D], negative-lag kernel or None): parameters times the window."""
    window = decay_window(length, self.max_seq_len, self.d_model)
    k = self.kernel[...][:, :length].astype(jnp.float32) * window[None]
    return k[0], (k[1] if k.shape[0] == 2 else None)

  def project(self, x_btd):
    """(x1, x2, v) before the short convolution, [b, t, 3, D]."""
    return jnp.stack([self.gate_in(x_btd), self.gate_out(x_btd), self.value(x_btd)], axis=2)

  def mix(self, u, valid):
    """The gated long convolution over a whole sequence, with Monarch DFTs."""
    z = u[:, :, 0].astype(jnp.float32) * u[:, :, 2].astype(jnp.float32)
    if valid is not None:
      z = z * valid[:, :, None]
    y = monarch_conv(z, *self.kernels(u.shape[1])) + self.skip[...].astype(jnp.float32) * z
    return self.out_proj((u[:, :, 1].astype(jnp.float32) * y).astype(self.dtype))

  def mix_cached(self, u, zs, index, q_pos):
    """New tokens: the long convolution is a direct sum over the cache."""
    z = u[:, :, 0].astype(jnp.float32) * u[:, :, 2].astype(jnp.float32)
    zs = jax.lax.dynamic_update_slice(zs, z, (0, index, 0))
    kernel = self.kernels(zs.shape[1])[0]
    y = direct_causal_conv(zs, kernel, q_pos) + self.skip[...].astype(jnp.float32) * z
    return self.out_proj((u[:, :, 1].astype(jnp.float32) * y).astype(self.dtype)), zs


@MIXERS.register("monarch")
def _monarch(cfg, *, causal: bool, rngs: nnx.Rngs) -> MonarchMixer:
  options = mixer_options(cfg, "monarch", DEFAULTS)
  return MonarchMixer(
    cfg.d_model,
    max_seq_len=cfg.max_seq_len,
    causal=causal,
    **layer_kwargs(cfg, rngs),
    **options,
  )

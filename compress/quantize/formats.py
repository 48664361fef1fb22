"""Number formats: symmetric int8 / int4 round-to-nearest, int4 packing, NF4 with double quantization.

Weights are [K, N] (inputs, outputs), as `x @ w` uses them. Scales are symmetric (no zero point):

  int8  per output channel: s[n] = max_k |w[k, n]| / 127, q = round(w / s) in [-127, 127].
  int4  per group of `group_size` consecutive K rows and output channel: s[g, n] = max |w| / 7,
        q in [-8, 7] (RTN gives [-7, 7]; GPTQ's error feedback may reach -8). K is padded with zero
        rows to a multiple of the group size, so any width works (the padded rows quantize to 0).
  int4 packing (the layout of `kernels_pallas/quant_matmul`): two values per int8 byte along K,
        packed[r, n] = (q[2r, n] & 0xF) | (q[2r + 1, n] << 4), so [K, N] -> [K / 2, N].
  NF4   (QLoRA, Dettmers et al. 2023): per block of `block_size` K rows and output channel,
        w / absmax is rounded to the nearest of 16 normal-quantile levels (`nf4_code`), stored as
        4-bit indices packed like int4 (unsigned). Double quantization stores the float32 absmax
        constants as int8 after subtracting their mean, with one float32 scale per 256 of them
        (QLoRA uses FP8 there; int8 is this file's choice): 32/64 = 0.5 extra bits per weight
        becomes 8/64 + 32/(64 * 256) ≈ 0.127.
"""

import functools
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np

GROUP_SIZES = (32, 64, 128)
NF4_OFFSET = 0.9677083  # QLoRA: the quantile range [1 - offset, offset] keeps the extremes finite.


def pad_rows(w: jax.Array, multiple: int) -> jax.Array:
  """Pads axis 0 with zeros to a multiple of `multiple`."""
  k = w.shape[0]
  kp = -(-k // multiple) * multiple
  return jnp.pad(w, [(0, kp - k)] + [(0, 0)] * (w.ndim - 1)) if kp != k else w


def _safe_scale(amax: jax.Array, qmax: float) -> jax.Array:
  return jnp.where(amax > 0, amax / qmax, 1.0).astype(jnp.float32)


# ---- int8 -----------------------------------------------------------------------------------


@jax.jit
def quantize_int8(w_kn: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-output-channel int8: w [K, N] -> (q int8 [K, N], scales float32 [N])."""
  w = w_kn.astype(jnp.float32)
  scales = _safe_scale(jnp.max(jnp.abs(w), axis=0), 127.0)
  return jnp.clip(jnp.round(w / scales), -127, 127).astype(jnp.int8), scales


@jax.jit
def quantize_rows_int8(x_mk: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-row (per-token) dynamic int8 of activations: x [M, K] -> (q int8 [M, K], scales [M])."""
  x = x_mk.astype(jnp.float32)
  scales = _safe_scale(jnp.max(jnp.abs(x), axis=-1), 127.0)
  return jnp.clip(jnp.round(x / scales[:, None]), -127, 127).astype(jnp.int8), scales


# ---- int4 -----------------------------------------------------------------------------------


def int4_group_scales(w_kn: jax.Array, group_size: int, qmax: float = 7.0) -> jax.Array:
  """max |w| / qmax per group of K rows and output: [K, N] (K a multiple) -> [K / g, N]."""
  k, n = w_kn.shape
  groups = w_kn.astype(jnp.float32).reshape(k // group_size, group_size, n)
  return _safe_scale(jnp.max(jnp.abs(groups), axis=1), qmax)


@functools.partial(jax.jit, static_argnames="group_size")
def quantize_int4(w_kn: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
  """Group-wise int4: w [K, N] -> (q int8 [Kp, N] in [-7, 7], scales [Kp / g, N]), K padded."""
  w = pad_rows(w_kn.astype(jnp.float32), group_size)
  scales = int4_group_scales(w, group_size)
  q = jnp.round(w / jnp.repeat(scales, group_size, axis=0))
  return jnp.clip(q, -8, 7).astype(jnp.int8), scales


@jax.jit
def pack_int4(q: jax.Array) -> jax.Array:
  """int4 values (in [-8, 7], or codes in [0, 15]) [K, ...] -> int8 [K / 2, ...]; K even."""
  if q.shape[0] % 2:
    raise ValueError(f"pack_int4: K (axis 0) must be even; got shape {q.shape}")
  q = q.astype(jnp.int32)
  byte = (q[0::2] & 0xF) | ((q[1::2] & 0xF) << 4)  # In [0, 255].
  return jnp.where(byte >= 128, byte - 256, byte).astype(jnp.int8)


@functools.partial(jax.jit, static_argnames="signed")
def unpack_int4(packed: jax.Array, *, signed: bool = True) -> jax.Array:
  """Inverse of `pack_int4`: int8 [K / 2, ...] -> int8 [K, ...] (signed [-8, 7] or [0, 15])."""
  p = packed.astype(jnp.int32)
  if signed:  # Arithmetic shifts of the 32-bit word sign-extend each nibble.
    lo, hi = (p << 28) >> 28, (p << 24) >> 28
  else:
    lo, hi = p & 0xF, (p >> 4) & 0xF
  out = jnp.stack([lo, hi], axis=1).reshape(2 * packed.shape[0], *packed.shape[1:])
  return out.astype(jnp.int8)


@functools.partial(jax.jit, static_argnames=("group_size", "k"))
def dequantize_int4(packed: jax.Array, scales: jax.Array, group_size: int, k: int) -> jax.Array:
  """Packed int4 [Kp / 2, N] with scales [Kp / g, N] -> float32 [k, N] (padding dropped)."""
  w = unpack_int4(packed).astype(jnp.float32) * jnp.repeat(scales, group_size, axis=0)
  return w[:k]


# ---- NF4 ------------------------------------------------------------------------------------


@functools.cache
def nf4_code() -> np.ndarray:
  """The 16 NF4 levels in [-1, 1]: normal quantiles, 8 positive, 7 negative and an exact 0.

  Positive levels are Φ⁻¹ at 8 evenly spaced probabilities in [offset, 0.5), negative ones at 7;
  both sides are scaled so the extremes are ±1 (QLoRA's asymmetric construction, which keeps an
  exact zero with 2^4 levels).
  """
  inv_cdf = statistics.NormalDist().inv_cdf  # Plain Python: safe to call while tracing.
  pos = [inv_cdf(p) for p in np.linspace(NF4_OFFSET, 0.5, 9)[:-1]]
  neg = [-inv_cdf(p) for p in np.linspace(NF4_OFFSET, 0.5, 8)[:-1]]
  code = np.sort(np.array([*pos, 0.0, *neg]))
  return (code / np.abs(code).max()).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("block_size", "double_quant", "dq_block"))
def quantize_nf4(
  w_kn: jax.Array, block_size: int = 64, *, double_quant: bool = True, dq_block: int = 256
) -> dict[str, jax.Array]:
  """NF4 arrays for w [K, N] (see the module docstring).

  Returns:
    {"codes": int8 [Kp / 2, N] (packed 4-bit indices), and either "absmax": float32
    [Kp / block, N] or its double quantization "absmax_q": int8 [Kp / block, N],
    "absmax_scale": float32 [ceil(count / dq_block)], "absmax_mean": float32 []}.
  """
  w = pad_rows(w_kn.astype(jnp.float32), block_size)
  k, n = w.shape
  blocks = w.reshape(k // block_size, block_size, n)
  absmax = jnp.max(jnp.abs(blocks), axis=1)  # [Kp / block, N]
  out = {}
  if double_quant:
    out.update(_double_quant(absmax, dq_block))
    absmax = dequantize_absmax(out, absmax.shape, dq_block)
  else:
    out["absmax"] = absmax
  normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
  code = jnp.asarray(nf4_code())
  mids = (code[1:] + code[:-1]) / 2
  idx = jnp.searchsorted(mids, normed.reshape(k, n))  # Nearest level.
  out["codes"] = pack_int4(idx)
  return out


def _double_quant(absmax: jax.Array, dq_block: int) -> dict[str, jax.Array]:
  flat = absmax.reshape(-1)
  mean = jnp.mean(flat)
  centred = pad_rows(flat - mean, dq_block).reshape(-1, dq_block)
  scale = _safe_scale(jnp.max(jnp.abs(centred), axis=1), 127.0)  # [blocks2]
  q = jnp.clip(jnp.round(centred / scale[:, None]), -127, 127).reshape(-1)[: flat.size]
  return {
    "absmax_q": q.astype(jnp.int8).reshape(absmax.shape),
    "absmax_scale": scale,
    "absmax_mean": mean.astype(jnp.float32),
  }


@functools.partial(jax.jit, static_argnames=("shape", "dq_block"))
def dequantize_absmax(arrays: dict[str, jax.Array], shape, dq_block: int) -> jax.Array:
  """The float32 block absmax [Kp / block, N] from its double quantization."""
  count = math.prod(shape)
  q = pad_rows(arrays["absmax_q"].reshape(-1).astype(jnp.float32), dq_block)
  flat = (q.reshape(-1, dq_block) * arrays["absmax_scale"][:, None]).reshape(-1)[:count]
  return flat.reshape(shape) + arrays["absmax_mean"]


@functools.partial(jax.jit, static_argnames=("block_size", "k", "dq_block"))
def dequantize_nf4(
  arrays: dict[str, jax.Array], block_size: int, k: int, *, dq_block: int = 256
) -> jax.Array:
  """float32 [k, N] from `quantize_nf4` arrays."""
  idx = unpack_int4(arrays["codes"], signed=False).astype(jnp.int32)  # [Kp, N]
  kp, n = idx.shape
  if "absmax" in arrays:
    absmax = arrays["absmax"]
  else:
    absmax = dequantize_absmax(arrays, (kp // block_size, n), dq_block)
  w = jnp.asarray(nf4_code())[idx] * jnp.repeat(absmax, block_size, axis=0)
  return w[:k]

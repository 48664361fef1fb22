"""Low-bit matmuls by their definitions, in plain `jnp`: the kernel tests' oracle and the CPU fallback.

  int8_matmul:       out = (x @ w_q) * scales                     per-output-channel scale [N]
  int4_matmul:       out = Σ_g (x[:, g] @ w_q[g, :]) * scales[g]   one scale per group of K rows
  int8_int8_matmul:  acc = x_q @ w_q in int32,  out = acc * x_scale[:, None] * w_scale[None, :]

x is float32 or bfloat16 with any leading dims ([..., K]); products and sums are float32 (the
int8 x int8 product is exact in int32). For int4, Σ_g (x_g @ w_g) s_g = x @ (w ∘ s) in exact
arithmetic, so the float32 reference dequantizes the weights once (no [M, groups, N] temporary).
"""

import jax
import jax.numpy as jnp
from jax import lax

from reslm.kernels_pallas.quant_matmul.packing import unpack_int4

_HIGHEST = lax.Precision.HIGHEST


def dequantize_int8(w_q: jax.Array, scales: jax.Array) -> jax.Array:
  """int8 [K, N] with scales [N] -> float32 [K, N]."""
  return w_q.astype(jnp.float32) * scales.astype(jnp.float32)


def dequantize_int4(w_packed: jax.Array, scales: jax.Array, group_size: int) -> jax.Array:
  """Packed int4 [K / 2, N] with group scales [K / group_size, N] -> float32 [K, N]."""
  w = unpack_int4(w_packed).astype(jnp.float32)
  return w * jnp.repeat(scales.astype(jnp.float32), group_size, axis=0)


def _matmul(x, w_f32, out_dtype):
  out = jnp.matmul(x.astype(jnp.float32), w_f32, precision=_HIGHEST)
  return out.astype(out_dtype or x.dtype)


def int8_matmul(x, w_q, scales, *, out_dtype=None) -> jax.Array:
  """(x @ w_q) * scales with float32 accumulation: x [..., K], w_q int8 [K, N], scales [N]."""
  acc = jnp.matmul(x.astype(jnp.float32), w_q.astype(jnp.float32), precision=_HIGHEST)
  return (acc * scales.astype(jnp.float32)).astype(out_dtype or x.dtype)


def int4_matmul(x, w_packed, scales, *, group_size: int, out_dtype=None) -> jax.Array:
  """x [..., K] times packed int4 [K / 2, N] with group scales [K / group_size, N]."""
  return _matmul(x, dequantize_int4(w_packed, scales, group_size), out_dtype)


def int8_int8_matmul(x_q, w_q, x_scale=None, w_scale=None, *, out_dtype=jnp.float32) -> jax.Array:
  """int8 [..., K] x int8 [K, N] -> int32 (no scales) or acc * x_scale[..., None] * w_scale."""
  acc = lax.dot_general(
    x_q, w_q, (((x_q.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32
  )
  if x_scale is None:
    return acc
  out = acc.astype(jnp.float32) * x_scale.astype(jnp.float32)[..., None]
  return (out * w_scale.astype(jnp.float32)).astype(out_dtype)

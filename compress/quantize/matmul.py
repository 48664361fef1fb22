"""The low-bit matmuls the quantized layers compute through.

  int8_matmul:       (x @ w_q) * scales                        weight-only, per-output-channel
  int4_matmul:       x @ (unpack(w_packed) * group scales)      weight-only, group-wise
  int8_int8_matmul:  int32 acc = x_q @ w_q (exact), then acc * x_scale[m] * w_scale[n]

Same signatures and storage formats as `kernels_pallas/quant_matmul` (Pallas kernels for TPU/GPU
with a jnp reference on CPU). Until that package's `api` module is committed these are plain jnp
definitions; `KERNELS` is the one-line hook that switches every quantized layer over to it.
"""

import jax
import jax.numpy as jnp
from jax import lax

from compress.quantize import formats

# Hook: set to `kernels_pallas.quant_matmul.api` (implementation="auto") once it is committed.
KERNELS = None


def int8_matmul(x_mk: jax.Array, w_q: jax.Array, scales: jax.Array, *, out_dtype=None):
  """x [M, K] times int8 [K, N] with scales [N], float32 accumulation."""
  if KERNELS is not None:
    return KERNELS.int8_matmul(x_mk, w_q, scales, out_dtype=out_dtype)
  acc = jnp.matmul(
    x_mk.astype(jnp.float32), w_q.astype(jnp.float32), preferred_element_type=jnp.float32
  )
  return (acc * scales.astype(jnp.float32)).astype(out_dtype or x_mk.dtype)


def int4_matmul(x_mk, w_packed, scales, *, group_size: int, out_dtype=None):
  """x [M, K] times packed int4 [Kp / 2, N] with group scales [Kp / group_size, N].

  K may be smaller than the padded Kp (the padded weight rows are zero).
  """
  kp = 2 * w_packed.shape[0]
  if KERNELS is not None:
    x_mk = jnp.pad(x_mk, [(0, 0), (0, kp - x_mk.shape[-1])])
    return KERNELS.int4_matmul(x_mk, w_packed, scales, group_size=group_size, out_dtype=out_dtype)
  w = formats.dequantize_int4(w_packed, scales, group_size, x_mk.shape[-1])  # [K, N] float32
  out = jnp.matmul(x_mk.astype(jnp.float32), w, preferred_element_type=jnp.float32)
  return out.astype(out_dtype or x_mk.dtype)


def int8_int8_matmul(x_q, w_q, x_scale=None, w_scale=None, *, out_dtype=jnp.float32):
  """int8 [M, K] x int8 [K, N] -> int32 [M, N] (no scales), or acc * x_scale[m] * w_scale[n].

  The product is accumulated in int32 (`preferred_element_type`), exact for K < 2^17; XLA:CPU
  lowers it to the int8 dot units (VNNI/AMX) where present.
  """
  if KERNELS is not None:
    return KERNELS.int8_int8_matmul(x_q, w_q, x_scale, w_scale, out_dtype=out_dtype)
  acc = lax.dot_general(
    x_q, w_q, (((x_q.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32
  )
  if x_scale is None:
    return acc
  out = acc.astype(jnp.float32) * x_scale.astype(jnp.float32)[..., None]
  return (out * w_scale.astype(jnp.float32)).astype(out_dtype)

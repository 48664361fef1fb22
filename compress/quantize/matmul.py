"""The low-bit matmuls the quantized layers compute through: `kernels_pallas.quant_matmul`.

  int8_matmul:       (x @ w_q) * scales                        weight-only, per-output-channel
  int4_matmul:       x @ (unpack(w_packed) * group scales)      weight-only, group-wise
  int8_int8_matmul:  int32 acc = x_q @ w_q (exact), then acc * x_scale[m] * w_scale[n]

`implementation="auto"` picks the Pallas kernel on TPU / GPU and the kernels' jnp reference
elsewhere (CPU), per platform when the program is lowered. The storage formats are the kernels'
(`compress.quantize.formats` writes them). These wrappers only adapt shapes: the quantized layers
may keep K unpadded for int4 (the kernel wants K a multiple of the group size).
"""

import jax
import jax.numpy as jnp

from reslm.kernels_pallas.quant_matmul import api


def int8_matmul(x_mk: jax.Array, w_q: jax.Array, scales: jax.Array, *, out_dtype=None):
  """x [M, K] (float32 / bfloat16) times int8 [K, N] with scales [N]."""
  return api.int8_matmul(x_mk, w_q, scales, out_dtype=out_dtype)


def int4_matmul(x_mk, w_packed, scales, *, group_size: int, out_dtype=None):
  """x [M, K] times packed int4 [Kp / 2, N] with group scales [Kp / group_size, N].

  K may be smaller than the padded Kp: x gets zero columns (the padded weight rows are zero).
  """
  pad = 2 * w_packed.shape[0] - x_mk.shape[-1]
  x = jnp.pad(x_mk, [(0, 0), (0, pad)]) if pad else x_mk
  return api.int4_matmul(x, w_packed, scales, group_size=group_size, out_dtype=out_dtype)


def int8_int8_matmul(x_q, w_q, x_scale=None, w_scale=None, *, out_dtype=jnp.float32):
  """int8 [M, K] x int8 [K, N] -> int32 [M, N] (no scales), or acc * x_scale[m] * w_scale[n].

  Accumulated exactly in int32 (`preferred_element_type=int32` in the reference; the int8 MXU /
  tensor cores in the kernels); XLA:CPU lowers it to the int8 dot units (VNNI/AMX) where present.
  """
  return api.int8_int8_matmul(x_q, w_q, x_scale, w_scale, out_dtype=out_dtype)

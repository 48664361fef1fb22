"""Weight quantizers and the int4 packing used by the low-bit matmuls.

int4 packing (two signed 4-bit values per int8 byte, along K):

  packed[r, n] = (w[2r, n] & 0xF) | (w[2r + 1, n] << 4)

i.e. the low nibble holds the even row 2r of K and the high nibble the odd row 2r + 1, both two's
complement in [-8, 7]. A [K, N] int4 matrix becomes a [K / 2, N] int8 array; K must be even. The
format does not depend on any kernel tile size, so a checkpoint packs once for every backend, and
a contiguous slice of packed rows is a contiguous slice of K (sharding K splits cleanly).

Scales: int8 weights carry one float32 scale per output channel, [N]; int4 weights one per group of
`group_size` consecutive K rows and output channel, [K / group_size, N]. Dequantized weights are
w_q * scale (symmetric, no zero point).
"""

import jax
import jax.numpy as jnp

GROUP_SIZES = (32, 64, 128)


def pack_int4(w: jax.Array) -> jax.Array:
  """Packs int4 values (any integer dtype, each in [-8, 7]) [K, ...] into int8 [K / 2, ...].

  Values outside [-8, 7] are wrapped to 4 bits (quantize first with `quantize_int4`).
  """
  if w.shape[0] % 2:
    raise ValueError(f"pack_int4: K (axis 0) must be even; got shape {w.shape}")
  if not jnp.issubdtype(w.dtype, jnp.integer):
    raise ValueError(f"pack_int4: expected integer values in [-8, 7]; got dtype {w.dtype}")
  w = w.astype(jnp.int32)
  lo, hi = w[0::2], w[1::2]
  byte = (lo & 0xF) | ((hi & 0xF) << 4)  # In [0, 255].
  return jnp.where(byte >= 128, byte - 256, byte).astype(jnp.int8)


def unpack_int4_halves(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(even rows, odd rows) of packed int4, each int32 [K / 2, ...], sign-extended."""
  p = packed.astype(jnp.int32)
  # Arithmetic shifts of the 32-bit word sign-extend each nibble.
  return (p << 28) >> 28, (p << 24) >> 28


def unpack_int4(packed: jax.Array) -> jax.Array:
  """Inverse of `pack_int4`: int8 [K / 2, ...] -> int8 [K, ...] with values in [-8, 7]."""
  lo, hi = unpack_int4_halves(packed)
  return (
    jnp.stack([lo, hi], axis=1).reshape(2 * packed.shape[0], *packed.shape[1:]).astype(jnp.int8)
  )


def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-output-channel int8: w [K, N] -> (w_q int8 [K, N], scales float32 [N])."""
  w = w.astype(jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=0)
  scales = jnp.where(amax > 0, amax / 127.0, 1.0)
  w_q = jnp.clip(jnp.round(w / scales), -127, 127).astype(jnp.int8)
  return w_q, scales


def quantize_int4(w: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
  """Symmetric group-wise int4: w [K, N] -> (packed int8 [K / 2, N], scales float32 [K / g, N]).

  Each group of `group_size` consecutive K rows of one column maps its max |w| to 7.
  """
  k, n = w.shape
  if group_size not in GROUP_SIZES or k % group_size:
    raise ValueError(
      f"quantize_int4: group_size={group_size} must be one of {GROUP_SIZES} and divide K={k}"
    )
  groups = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
  amax = jnp.max(jnp.abs(groups), axis=1)
  scales = jnp.where(amax > 0, amax / 7.0, 1.0)
  w_q = jnp.clip(jnp.round(groups / scales[:, None]), -8, 7).reshape(k, n).astype(jnp.int8)
  return pack_int4(w_q), scales


def quantize_rows_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-row int8 activations: x [M, K] -> (x_q int8 [M, K], scales float32 [M])."""
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1)
  scales = jnp.where(amax > 0, amax / 127.0, 1.0)
  x_q = jnp.clip(jnp.round(x / scales[..., None]), -127, 127).astype(jnp.int8)
  return x_q, scales

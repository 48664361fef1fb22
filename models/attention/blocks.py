"""Blocking helpers shared by the blockwise attention variants (memory_efficient, flash,
sliding_window): setting checks, padding to block multiples, per-block masks and reshapes."""

import jax
import jax.numpy as jnp

from reslm.models.attention.base import MaskInfo


def check_positive(variant: str, key: str, value) -> int:
  """Returns `value` if it is a positive int, else raises a one-line ValueError naming the key."""
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(
      f"{key}={value!r} is not allowed for {variant!r} attention; it must be a positive integer"
    )
  return value


def pad_axis(x: jax.Array | None, multiple: int, axis: int, value=0) -> jax.Array | None:
  """Pads `axis` of `x` at the end up to a multiple of `multiple` (None passes through)."""
  if x is None:
    return None
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def padded_mask_arrays(info: MaskInfo, block_q: int, block_k: int):
  """The MaskInfo arrays padded to block multiples: padded keys are invalid, padded queries junk.

  Returns:
    (q_pos, q_seg) padded along queries and (kv_pos, kv_valid, kv_seg) padded along keys.
  """
  q_side = (pad_axis(info.q_pos, block_q, 1), pad_axis(info.q_seg, block_q, 1))
  kv_side = (
    pad_axis(info.kv_pos, block_k, 1),
    pad_axis(info.kv_valid, block_k, 1, False),
    pad_axis(info.kv_seg, block_k, 1),
  )
  return q_side, kv_side


def block_mask(q_pos, q_seg, kv_pos, kv_valid, kv_seg, causal: bool) -> jax.Array:
  """The boolean mask of one (query block, key block) pair, [b, bq, bk]."""
  return MaskInfo(q_pos, kv_pos, kv_valid, q_seg, kv_seg, causal).dense_mask()


def to_blocks(x: jax.Array | None, block: int) -> jax.Array | None:
  """[b, n * block, ...] -> [n, b, block, ...], the layout `lax.scan` iterates over."""
  if x is None:
    return None
  b, n = x.shape[0], x.shape[1] // block
  return jnp.moveaxis(x.reshape(b, n, block, *x.shape[2:]), 1, 0)


def from_blocks(x: jax.Array) -> jax.Array:
  """[n, b, block, ...] -> [b, n * block, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])

"""Sliding-window (local) attention: Longformer (Beltagy et al. 2020) / Mistral 7B (Jiang et al.
2023).

Each query sees only the keys within `window` positions of it: keys in (i - window, i] when causal,
|i - j| < window when bidirectional (on top of the usual padding / segment mask).

Algorithm: queries are cut into blocks of B; a query block starting at q0 can only see keys in
[q0 - (window - 1), q0 + B + (window - 1)), so each block attends (exact softmax) to that one
contiguous span, cut with `dynamic_slice` from keys padded on both sides. A `lax.map` over blocks
keeps one [B, B + 2·window] score tile live, so time and memory are O(T · window), not O(T²).

With a KV cache (query and key lengths differ) the shell passes the whole cache; decoding then
masks the cache by position, which is exact and costs what any cached attention step costs.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.attention.base import Attention, MaskInfo, attention_kwargs, reference_attention
from reslm.models.attention.blocks import check_positive, from_blocks, pad_axis, to_blocks
from reslm.models.registry import MIXERS, mixer_options

MAX_BLOCK = 128  # Query block size cap; smaller windows use blocks of about the window size.


def band_mask(q_pos: jax.Array, kv_pos: jax.Array, window: int, causal: bool) -> jax.Array:
  """Which keys lie within `window` of each query, [b, q_len, kv_len] (causality not included)."""
  offset = q_pos[:, :, None] - kv_pos[:, None, :]  # [b, t, s]
  return offset < window if causal else jnp.abs(offset) < window


def _pad_sides(x: jax.Array | None, left: int, right: int, value=0) -> jax.Array | None:
  if x is None:
    return None
  widths = [(0, 0)] * x.ndim
  widths[1] = (left, right)
  return jnp.pad(x, widths, constant_values=value)


def banded_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo, window: int
) -> jax.Array:
  """Sliding-window self-attention where query i and key i are the same token (no cache).

  Args:
    q: Queries, [b, t, heads, d].
    k: Keys, [b, t, kv_heads, d].
    v: Values, [b, t, kv_heads, d].
    info: The mask description; the band is applied to its positions.
    window: How far each query sees.

  Returns:
    [b, t, heads, d]; equal to dense attention under `info.dense_mask() & band_mask(...)`.
  """
  b, t = q.shape[:2]
  block = min(t, max(16, min(window, MAX_BLOCK)))
  q = pad_axis(q, block, 1)  # [b, tq, h, d]
  tq = q.shape[1]
  # Keys that a block can see, at most window - 1 behind (and ahead, unless causal).
  left = min(window - 1, tq)
  right = tq - t + (0 if info.causal else left)
  span = block + left + (0 if info.causal else left)
  k, v = _pad_sides(k, left, right), _pad_sides(v, left, right)  # [b, left + tq (+ left), g, d]
  kv_pos = _pad_sides(info.kv_pos, left, right)
  kv_valid = _pad_sides(info.kv_valid, left, right, False)
  kv_seg = _pad_sides(info.kv_seg, left, right)
  q_blocks = (
    to_blocks(q, block),  # [nq, b, block, h, d]
    to_blocks(pad_axis(info.q_pos, block, 1), block),
    to_blocks(pad_axis(info.q_seg, block, 1), block),
  )

  def query_block(xs):
    i, q_blk, qp, qsg = xs
    # Key index j sits at padded index j + left, so this span covers keys [q0 - left, q0 + span).
    start = i * block

    def cut(x):
      return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, span, axis=1)

    kp = cut(kv_pos)
    mask = MaskInfo(qp, kp, cut(kv_valid), qsg, cut(kv_seg), info.causal).dense_mask()
    mask = mask & band_mask(qp, kp, window, info.causal)  # [b, block, span]
    return reference_attention(q_blk, cut(k), cut(v), mask)  # [b, block, h, d]

  out = jax.lax.map(query_block, (jnp.arange(tq // block), *q_blocks))
  return from_blocks(out)[:, :t]


class SlidingWindowAttention(Attention):
  """Softmax attention restricted to a band of `window` positions around each query.

  Args:
    window: Keys within this many positions are visible (the query's own position included).
    **kwargs: As for `Attention`.
  """

  softmax_decode = True  # Exact softmax under `decode_mask`: int8 KV is attended from its codes.

  def __init__(self, *args, window: int = 256, **kwargs):
    self.window = check_positive("sliding_window", "window", window)
    super().__init__(*args, **kwargs)

  def decode_mask(self, info: MaskInfo) -> jax.Array:
    """The cache masked by position: the usual mask and the band."""
    return info.dense_mask() & band_mask(info.q_pos, info.kv_pos, self.window, self.causal)

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo) -> jax.Array:
    if q.shape[1] != k.shape[1]:  # Decoding against a KV cache: mask the cache by position.
      return reference_attention(q, k, v, self.decode_mask(info))
    return banded_attention(q, k, v, info, self.window)


@MIXERS.register("sliding_window")
def _sliding_window(cfg, *, causal: bool, rngs: nnx.Rngs) -> SlidingWindowAttention:
  options = mixer_options(cfg, "sliding_window", {"window": 256})
  return SlidingWindowAttention(**attention_kwargs(cfg, causal=causal, rngs=rngs), **options)

"""Memory-efficient exact attention (Rabe & Staats 2021, "Self-attention does not need O(n²)
memory").

Algorithm: queries are split into chunks of `block_q` and keys/values into chunks of `block_k`.
For each query chunk a `jax.lax.scan` over the key chunks keeps the "lazy softmax" state in float32
(running max m, running sum l = Σ exp(s - m), weighted value sum acc = Σ exp(s - m) v), rescaling
it by exp(m_old - m_new) whenever the max grows; the output is acc / l. Each query chunk (and each
key step inside it) is wrapped in `jax.checkpoint`, so the backward pass recomputes the chunk's
scores instead of storing them: neither direction ever holds a [T, S] matrix.

Lengths that are not multiples of the chunk sizes are padded; padded keys are invalid in the mask
and padded query rows are sliced off.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.attention.base import NEG_INF, Attention, MaskInfo, attention_kwargs
from reslm.models.attention.blocks import (
  block_mask,
  check_positive,
  from_blocks,
  pad_axis,
  padded_mask_arrays,
  to_blocks,
)
from reslm.models.registry import MIXERS, mixer_options


def chunked_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo, block_q: int, block_k: int
) -> jax.Array:
  """Exact masked attention with O(block_q · (block_k + d)) live memory per step.

  Args:
    q: Queries, [b, t, heads, d].
    k: Keys, [b, s, kv_heads, d].
    v: Values, [b, s, kv_heads, d].
    info: The mask description.
    block_q: Query chunk size (clipped to t).
    block_k: Key chunk size (clipped to s).

  Returns:
    [b, t, heads, d] in q's dtype; rows that see no key are zero, as in `reference_attention`.
  """
  b, t, h, d = q.shape
  s, g = k.shape[1], k.shape[2]
  r = h // g
  bq, bk = min(block_q, t), min(block_k, s)
  scale = d**-0.5
  (q_pos, q_seg), (kv_pos, kv_valid, kv_seg) = padded_mask_arrays(info, bq, bk)
  q = pad_axis(q, bq, 1).reshape(b, -1, g, r, d)  # [b, tq, g, r, d]
  kv_blocks = (
    to_blocks(pad_axis(k, bk, 1), bk),  # [nk, b, bk, g, d]
    to_blocks(pad_axis(v, bk, 1), bk),
    to_blocks(kv_pos, bk),
    to_blocks(kv_valid, bk),
    to_blocks(kv_seg, bk),
  )

  @jax.checkpoint  # Only the carry is kept per key step; scores are recomputed in the backward.
  def key_step(carry, xs, qc, qp, qsg):
    m, row_sum, acc = carry  # [b, g, r, bq], [b, g, r, bq], [b, g, r, bq, d]
    kc, vc, kp, kvv, ksg = xs
    mask = block_mask(qp, qsg, kp, kvv, ksg, info.causal)[:, None, None]  # [b, 1, 1, bq, bk]
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", qc, kc, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, NEG_INF)
    # The result does not depend on the shift m, so its gradient is not needed.
    m_new = jax.lax.stop_gradient(jnp.maximum(m, scores.max(-1)))
    p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)  # [b, g, r, bq, bk]
    correction = jnp.exp(m - m_new)
    row_sum = row_sum * correction + p.sum(-1)
    pv = jnp.einsum("bgrqk,bkgd->bgrqd", p.astype(v.dtype), vc, preferred_element_type=jnp.float32)
    return (m_new, row_sum, acc * correction[..., None] + pv), None

  @jax.checkpoint  # The backward keeps only each chunk's inputs and recomputes its scan.
  def query_chunk(xs):
    qc, qp, qsg = xs  # [b, bq, g, r, d], [b, bq], [b, bq]
    init = (
      jnp.full((b, g, r, bq), NEG_INF, jnp.float32),
      jnp.zeros((b, g, r, bq), jnp.float32),
      jnp.zeros((b, g, r, bq, d), jnp.float32),
    )
    (_, row_sum, acc), _ = jax.lax.scan(lambda c, x: key_step(c, x, qc, qp, qsg), init, kv_blocks)
    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]  # 0: no visible key, output 0.
    return jnp.moveaxis(out, 3, 1).astype(q.dtype)  # [b, bq, g, r, d]

  out = jax.lax.map(query_chunk, (to_blocks(q, bq), to_blocks(q_pos, bq), to_blocks(q_seg, bq)))
  return from_blocks(out)[:, :t].reshape(b, t, h, d)


class MemoryEfficientAttention(Attention):
  """Exact softmax attention computed in query/key chunks with rematerialisation.

  Args:
    block_q: Query chunk size.
    block_k: Key/value chunk size.
    **kwargs: As for `Attention`.
  """

  softmax_decode = True  # Exact softmax: an int8 KV cache is attended from its codes.

  def __init__(self, *args, block_q: int = 128, block_k: int = 128, **kwargs):
    self.block_q = check_positive("memory_efficient", "block_q", block_q)
    self.block_k = check_positive("memory_efficient", "block_k", block_k)
    super().__init__(*args, **kwargs)

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo) -> jax.Array:
    return chunked_attention(q, k, v, info, self.block_q, self.block_k)


@MIXERS.register("memory_efficient")
def _memory_efficient(cfg, *, causal: bool, rngs: nnx.Rngs) -> MemoryEfficientAttention:
  options = mixer_options(cfg, "memory_efficient", {"block_q": 128, "block_k": 128})
  return MemoryEfficientAttention(**attention_kwargs(cfg, causal=causal, rngs=rngs), **options)

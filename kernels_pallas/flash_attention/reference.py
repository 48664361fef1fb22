"""Attention by its definition, in plain `jnp`: the oracle of the kernel tests and the CPU fallback.

  out = softmax(q kᵀ · scale + mask) v,   lse = log Σ_visible exp(q kᵀ · scale)

with grouped-query heads (query head h uses key/value head h // (heads / kv_heads)), the softmax in
float32, a top-left aligned causal mask (query i sees keys j <= i) and optional segment ids (a query
sees only keys with its id). A query that sees no key outputs zeros and has lse = -inf.
"""

import jax
import jax.numpy as jnp

from reslm.kernels_pallas.flash_attention.config import MASK_VALUE


def attention_mask(q_len, kv_len, *, causal, q_segment_ids=None, kv_segment_ids=None):
  """Boolean [batch or 1, q_len, kv_len]: which key each query may see."""
  mask = jnp.ones((1, q_len, kv_len), bool)
  if causal:
    mask = mask & (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None])[None]
  if q_segment_ids is not None:
    mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return mask


def reference(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  q_segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  causal: bool = True,
  scale: float | None = None,
  precision=jax.lax.Precision.HIGHEST,
) -> tuple[jax.Array, jax.Array]:
  """Masked grouped-query softmax attention.

  Args:
    q: Queries, [batch, q_len, heads, head_dim].
    k: Keys, [batch, kv_len, kv_heads, head_dim].
    v: Values, [batch, kv_len, kv_heads, head_dim].
    q_segment_ids: Optional int [batch, q_len]; requires kv_segment_ids.
    kv_segment_ids: Optional int [batch, kv_len].
    causal: Top-left aligned causal mask.
    scale: Multiplier of q kᵀ (default head_dim ** -0.5).
    precision: Matmul precision (HIGHEST makes float32 matmuls exact on every backend).

  Returns:
    (out [batch, q_len, heads, head_dim] in q's dtype, lse float32 [batch, q_len, heads]).
  """
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  scale = d**-0.5 if scale is None else scale
  q5 = q.reshape(b, tq, hk, h // hk, d)  # [b, tq, kv_heads, group, d]
  s = jnp.einsum(
    "bqhgd,bkhd->bhgqk", q5, k, preferred_element_type=jnp.float32, precision=precision
  )
  s = s * scale  # [b, kv_heads, group, tq, tk]
  mask = attention_mask(
    tq, tk, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids
  )[:, None, None]
  s = jnp.where(mask, s, MASK_VALUE)
  m = s.max(-1, keepdims=True)
  p = jnp.exp(s - m)
  total = p.sum(-1, keepdims=True)
  probs = (p / total).astype(v.dtype)
  out = jnp.einsum(
    "bhgqk,bkhd->bqhgd", probs, v, preferred_element_type=jnp.float32, precision=precision
  )
  seen = mask.any(-1)  # [b|1, 1, 1, tq]
  out = out * jnp.moveaxis(seen, -1, 1)[..., None].astype(out.dtype)  # Empty rows -> 0.
  lse = jnp.where(seen, (m + jnp.log(total))[..., 0], -jnp.inf)  # [b, kv_heads, group, tq]
  lse = jnp.moveaxis(lse, -1, 1).reshape(b, tq, h)
  return out.reshape(b, tq, h, d).astype(q.dtype), lse

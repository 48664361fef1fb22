"""Paged-attention decode by its definition, in plain `jnp`: the kernel tests' oracle and the CPU
fallback.

Each sequence b has one query q[b] (all heads) and a KV cache stored in fixed-size pages: token t
of sequence b lives in page block_tables[b, t // page_size], row t % page_size, of the pool
k_pages / v_pages [kv_heads, pages, page_size, head_dim]. Only tokens t < lengths[b] are attended:

  out[b, h] = softmax_t(q[b, h] · k[b, t, h // group] · scale) v[b, t, h // group]

in float32 (group = heads / kv_heads, grouped-query attention). int8 pages carry one float scale
per token and kv head (k = k_int8 * k_scale). A sequence of length 0 outputs zeros. Entries of
the block table past a sequence's length are never used (any value).
"""

import jax
import jax.numpy as jnp
from jax import lax

from reslm.kernels_pallas.paged_attention.config import MASK_VALUE


def gather_pages(pages, block_tables, scales=None):
  """[kv_heads, P, page_size, D] pages -> float32 [batch, kv_heads, tokens, D] per sequence."""
  hk, _, ps, d = pages.shape
  b, pps = block_tables.shape
  x = pages[:, block_tables].astype(jnp.float32)  # [kv_heads, b, pps, ps, d]
  if scales is not None:
    x = x * scales[:, block_tables].astype(jnp.float32)[..., None]
  return jnp.swapaxes(x.reshape(hk, b, pps * ps, d), 0, 1)


def paged_attention(
  q, k_pages, v_pages, lengths, block_tables, *, k_scale=None, v_scale=None, scale=None
) -> jax.Array:
  """q [batch, heads, head_dim] -> [batch, heads, head_dim] in q's dtype."""
  b, h, d = q.shape
  hk = k_pages.shape[0]
  scale = d**-0.5 if scale is None else scale
  tables = jnp.clip(block_tables, 0, k_pages.shape[1] - 1)
  k = gather_pages(k_pages, tables, k_scale)
  v = gather_pages(v_pages, tables, v_scale)
  valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]  # [b, tokens]
  v = jnp.where(valid[:, None, :, None], v, 0.0)  # Unused slots may hold anything (NaN too).
  q4 = q.astype(jnp.float32).reshape(b, hk, h // hk, d)
  s = jnp.einsum("bhgd,bhtd->bhgt", q4, k, precision=lax.Precision.HIGHEST) * scale
  s = jnp.where(valid[:, None, None], s, MASK_VALUE)
  p = jnp.exp(s - s.max(-1, keepdims=True))
  p = jnp.where(valid[:, None, None], p, 0.0)
  total = p.sum(-1, keepdims=True)
  out = jnp.einsum("bhgt,bhtd->bhgd", p, v, precision=lax.Precision.HIGHEST)
  out = jnp.where(total > 0, out / jnp.where(total > 0, total, 1.0), 0.0)
  return out.reshape(b, h, d).astype(q.dtype)

"""Efficient Attention (Shen et al. 2021, "Efficient Attention: Attention with Linear Complexities").

Algorithm: normalise queries and keys separately instead of their product. ρ_q = softmax over the
feature axis of each query row, ρ_k = softmax over the sequence axis of each key feature, and
out = ρ_q(Q) (ρ_k(K)ᵀ V): a [d, d] global context instead of a [T, T] attention map.

* Bidirectional: the closed form above, O(T d²).
* Causal: query i may only see keys j <= i, so the key softmax becomes a prefix normalisation,
  out_i = Σ_f ρ_q(q_i)_f · N_i[f] / Z_i[f] with Z_i[f] = Σ_{j<=i} exp(k_jf) and
  N_i[f] = Σ_{j<=i} exp(k_jf) v_j. It is computed chunk by chunk in float32: inside a chunk the
  per-(query, key, feature) weights exp(k_jf - m_if) use the running max m_if (so every weight is
  <= 1 and Z_i >= 1), and `lax.scan` carries (m, Z, N) across chunks, rescaled by
  exp(m_old - m_new) whenever the max grows. Cost O(T c d + T d²); no [T, T] matrix.
* Decoding: (m, Z [b, kv_heads, d], N [b, kv_heads, d, d]) is a constant-size state. A zero state
  (as `LayerStack.init_cache` builds) is read as empty: where Z = 0 the max is taken as -inf.

Grouped-query heads share their kv head's context. Segment ids act as a padding mask only.

Positions: none by default, as in the paper (the softmaxes see un-rotated q and k); `rope=True`
applies RoPE to q and k before them (not in the paper).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.attention.base import NEG_INF, Attention
from reslm.models.attention.linear import check_chunk_size, position_free_kwargs, split_groups
from reslm.models.chunks import from_chunks, to_chunks
from reslm.models.registry import MIXERS, mixer_options


def bidirectional_efficient_attention(q, k, v, valid=None) -> jax.Array:
  """softmax_feature(Q) (softmax_seq(K)ᵀ V).

  Args:
    q: [b, t, h, d]; k, v: [b, t, kv_heads, d].
    valid: Optional bool [b, t], False at padding (excluded from the key softmax).

  Returns:
    [b, t, h, d] float32.
  """
  b, t, h, _ = q.shape
  rq = split_groups(jax.nn.softmax(q.astype(jnp.float32), axis=-1), k.shape[2])  # [b,t,g,r,d]
  k, v = k.astype(jnp.float32), v.astype(jnp.float32)
  mask = jnp.ones((b, t), bool) if valid is None else valid
  rk = jax.nn.softmax(jnp.where(mask[:, :, None, None], k, NEG_INF), axis=1)  # [b, t, g, d]
  rk = rk * mask[:, :, None, None]  # An all-padding row would otherwise be uniform.
  context = jnp.einsum("btgd,btge->bgde", rk, v)  # [b, g, d, e]
  out = jnp.einsum("btgrd,bgde->btgre", rq, context) * mask[:, :, None, None, None]
  return out.reshape(b, t, h, -1)


def causal_efficient_attention(q, k, v, *, chunk_size, valid=None, state=None, unroll=1):
  """Causal efficient attention by chunked, max-stabilised prefix sums.

  Args:
    q: [b, t, h, d]; k, v: [b, t, kv_heads, d].
    chunk_size: Tokens per chunk (capped at t).
    valid: Optional bool [b, t], False at padding.
    state: Optional (m [b, g, d], Z [b, g, d], N [b, g, d, e]) from earlier tokens.
    unroll: Passed to `lax.scan`.

  Returns:
    (output [b, t, h, d] float32, final state (m, Z, N)).
  """
  b, t, h, d = q.shape
  g, e = k.shape[2], v.shape[-1]
  rq = split_groups(jax.nn.softmax(q.astype(jnp.float32), axis=-1), g)  # [b, t, g, r, d]
  k, v = k.astype(jnp.float32), v.astype(jnp.float32)
  valid = jnp.ones((b, t), bool) if valid is None else valid
  if state is None:
    state = (jnp.zeros((b, g, d)), jnp.zeros((b, g, d)), jnp.zeros((b, g, d, e)))
  c = min(chunk_size, t)
  causal = jnp.tril(jnp.ones((c, c), bool))  # [i, j]

  def chunk(carry, xs):
    m, z, n = carry  # [b, g, d], [b, g, d], [b, g, d, e]
    cq, ck, cv, cvalid = xs  # [b, c, g, r, d], [b, c, g, d], [b, c, g, e], [b, c]
    m = jnp.where(z > 0, m, NEG_INF)  # An empty state has no max yet.
    seen = jnp.where(cvalid[:, :, None, None], ck, NEG_INF)
    m_i = jax.lax.stop_gradient(jnp.maximum(m[:, None], jax.lax.cummax(seen, axis=1)))  # [b,c,g,d]
    # Weights of key j for query i, per feature: exp(k_j - m_i) for visible j, else 0.
    visible = causal[None, :, :, None, None] & cvalid[:, None, :, None, None]
    logits = jnp.where(visible, ck[:, None, :] - m_i[:, :, None], NEG_INF)
    w = jnp.exp(logits)  # [b, i, j, g, d]
    decay = jnp.exp(m[:, None] - m_i)  # [b, c, g, d]; rescales the carried sums to m_i
    z_i = decay * z[:, None] + w.sum(axis=2)  # [b, c, g, d]
    qn = cq / jnp.where(z_i > 0, z_i, 1.0)[:, :, :, None, :]  # ρ_q(q_i)_f / Z_i[f]
    a = jnp.einsum("bigrd,bijgd->bgrij", qn, w)  # [b, g, r, c, c]
    out = jnp.einsum("bgrij,bjge->bigre", a, cv)
    out = out + jnp.einsum("bigrd,bgde->bigre", qn * decay[:, :, :, None, :], n)
    n = decay[:, -1, ..., None] * n + jnp.einsum("bjgd,bjge->bgde", w[:, -1], cv)
    return (m_i[:, -1], z_i[:, -1], n), out

  xs = (to_chunks(rq, c), to_chunks(k, c), to_chunks(v, c), to_chunks(valid, c))
  state, out = jax.lax.scan(chunk, tuple(x.astype(jnp.float32) for x in state), xs, unroll=unroll)
  out = from_chunks(out, t) * valid[:, :, None, None, None]  # [b, t, g, r, e]
  return out.reshape(b, t, h, e), state


class EfficientAttention(Attention):
  """Efficient attention (separate query / key softmaxes); decodes with a constant-size state.

  Args:
    chunk_size: Tokens per chunk of the causal form.
    **kwargs: As for `Attention`.
  """

  def __init__(self, *args, chunk_size: int = 64, **kwargs):
    self.chunk_size = check_chunk_size("efficient", chunk_size)
    super().__init__(*args, **kwargs)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """A zero state {"m", "z": [b, kv_heads, d], "n": [b, kv_heads, d, d]}; max_len is unused."""
    del max_len, dtype  # float32, constant size.
    g, d = self.num_kv_heads, self.head_dim
    zeros = jnp.zeros((batch, g, d), jnp.float32)
    return {"m": zeros, "z": zeros, "n": jnp.zeros((batch, g, d, d), jnp.float32)}

  def mix(self, q, k, v, *, segment_ids_bt=None, cache=None, cache_index=None):
    del cache_index  # The recurrent state already summarises every earlier token.
    valid = None if segment_ids_bt is None else segment_ids_bt != 0
    if cache is not None and (segment_ids_bt is not None or not self.causal):
      raise ValueError("efficient attention decodes only causally and without segment_ids")
    if not self.causal:
      return bidirectional_efficient_attention(q, k, v, valid).astype(q.dtype), None
    state = None if cache is None else (cache["m"], cache["z"], cache["n"])
    out, (m, z, n) = causal_efficient_attention(
      q, k, v, chunk_size=self.chunk_size, valid=valid, state=state
    )
    return out.astype(q.dtype), (None if cache is None else {"m": m, "z": z, "n": n})


@MIXERS.register("efficient")
def _efficient(cfg, *, causal: bool, rngs: nnx.Rngs) -> EfficientAttention:
  options = mixer_options(cfg, "efficient", {"chunk_size": 64, "rope": False})
  kwargs = position_free_kwargs(cfg, "efficient", options, causal=causal, rngs=rngs)
  return EfficientAttention(**kwargs, **options)

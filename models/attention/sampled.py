"""Importance-sampled softmax attention: each query row estimated from a few random keys.

softmax(QKᵀ/√d)V = D⁻¹AV with A = exp(QKᵀ/√d) and D = diag(A1). Both the numerator row
(AV)_i = Σ_j A_ij v_j and the normaliser D_i = Σ_j A_ij are estimated by importance sampling m
key columns per query row: with j_1..j_m drawn i.i.d. from p over the keys row i may see,

  (AV)_i ≈ (1/m) Σ_s A_ij_s v_j_s / p_j_s,    D_i ≈ (1/m) Σ_s A_ij_s / p_j_s,

which are unbiased; their ratio is a consistent estimate of the attention output. The proposal p
does not depend on the query: an equal mixture of the uniform distribution over the visible keys
and one proportional to |k_j|·|v_j| (keys with large norms tend to carry large scores and values).
The norms are learned, so a model can learn which tokens get sampled for every query, but not
which key a given query needs. This is a random-key estimator, not KDEformer (`kde.py`): KDEformer
adds LSH-found heavy entries and query-dependent (KDE) sampling probabilities, but shares its
samples across the sequence, which a causal decoder cannot. Causal masking restricts each row's
proposal to its own visible prefix, so a row never samples, and never depends on, later tokens.
With `num_samples` >= the number of keys every key is enumerated once instead (weight 1), which is
exact attention.

Costs: O(T·m·d) time; memory O(T·m) for the sample indices plus one block of queries' gathered
keys/values (rematerialised in the backward pass). Without segment ids the visible keys of every
row form a prefix, so one cumulative table [b, heads, s] serves all rows (uniform draws need no
table at all); with segment ids the tables are per row, [b, heads, t, s] scalars.

Randomness: the samples are drawn from the call's key (`stochastic.StochasticAttention`): fresh
per training step and layer, fixed per layer in evaluation. Decoding (with a KV cache, prefill
included) is exact softmax attention over the cache: it equals the full forward only in the
enumerating regime (`num_samples` >= max_len).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.attention.base import MaskInfo, attention_kwargs, reference_attention
from reslm.models.attention.stochastic import StochasticAttention
from reslm.models.registry import MIXERS, check_int, mixer_options

DEFAULTS = {"num_samples": 32, "seed": 0}


def _sample(cum: jax.Array, target: jax.Array) -> jax.Array:
  """Inverse-CDF lookup: first index whose cumulative weight exceeds target, over the last axis."""
  search = lambda c, x: jnp.searchsorted(c, x, side="right")  # noqa: E731
  for _ in range(cum.ndim - 1):
    search = jax.vmap(search)
  return search(cum, target)


def sampled_estimates(
  q, k, v, info: MaskInfo, num_samples: int, key, *, stabilise: bool = True, query_block: int = 256
):
  """Importance-sampled numerator and denominator of softmax attention.

  Args:
    q: Queries [b, t, h, d]; k, v: keys/values [b, s, kv_heads, d].
    info: Which keys each query may see.
    num_samples: Samples m per query row.
    key: PRNG key of the samples.
    stabilise: Scale both estimates by exp(-max sampled score) per row (cancels in the ratio).
    query_block: Queries whose sampled keys are gathered at once (rematerialised in the backward
      pass), so memory is O(T·m) indices plus O(query_block·m·d) gathered rows.

  Returns:
    (numerator [b, t, h, d], denominator [b, t, h], log-scale shift [b, t, h]) in float32: the
    estimates of Σ_j A_ij v_j and Σ_j A_ij, each times exp(-shift).
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  b, t, h, d = q.shape
  s, g = k.shape[1], k.shape[2]
  rep = h // g
  f32 = jnp.float32
  size = jnp.linalg.norm(k.astype(f32), axis=-1) * jnp.linalg.norm(v.astype(f32), axis=-1) + 1e-6
  size = jnp.repeat(size.transpose(0, 2, 1), rep, axis=1)  # [b, h, s]
  k_pick, k_u = jax.random.split(key)
  uniform = jax.random.bernoulli(k_pick, 0.5, (b, h, t, num_samples))
  u = jax.random.uniform(k_u, (b, h, t, num_samples), f32)
  if info.q_seg is None:
    # The shell's key slots are 0..s-1 and the valid ones a prefix, so the keys row i sees are
    # the prefix [0, n_i): one cumulative table serves every row and nothing is [t, s].
    n = jnp.sum(info.kv_valid, -1).astype(jnp.int32)[:, None]  # [b, 1]
    if info.causal:
      n = jnp.minimum(n, info.q_pos + 1)  # [b, t]
    n = jnp.broadcast_to(n, (b, t))[:, None, :]  # [b, 1, t]
    cum_size = jnp.cumsum(size, -1)  # [b, h, s]
    total = jnp.take_along_axis(cum_size, jnp.broadcast_to(jnp.maximum(n - 1, 0), (b, h, t)), -1)
    n_f = jnp.maximum(n, 1).astype(f32)
    by_size = jax.vmap(jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right")))(
      cum_size, u * total[..., None]
    )  # [b, h, t, m]
    by_count = jnp.floor(u * n_f[..., None]).astype(jnp.int32)
    idx = jnp.where(uniform, by_count, by_size)
    top = jnp.maximum(n - 1, 0)[..., None]  # Guards float round-off at the top end.
  else:
    mask = info.dense_mask()[:, None].astype(f32)  # [b, 1, t, s]
    cum_size = jnp.cumsum(mask * size[:, :, None, :], -1)  # [b, h, t, s]
    cum_one = jnp.broadcast_to(jnp.cumsum(mask, -1), (b, h, t, s))
    n = cum_one[..., -1].astype(jnp.int32)
    total = cum_size[..., -1]
    n_f = jnp.maximum(n, 1).astype(f32)
    target = jnp.where(uniform, u * n_f[..., None], u * total[..., None])
    idx = jnp.where(uniform, _sample(cum_one, target), _sample(cum_size, target))
    top = s - 1
  idx = jnp.clip(idx, 0, top)
  size_j = jnp.take_along_axis(size, idx.reshape(b, h, -1), -1).reshape(idx.shape)
  p = 0.5 / n_f[..., None] + 0.5 * size_j / total[..., None]  # [b, h, t, m]

  kv_head = jnp.arange(h) // rep
  k_h = k.transpose(0, 2, 1, 3)[:, kv_head]  # [b, h, s, d]
  v_h = v.transpose(0, 2, 1, 3)[:, kv_head].astype(f32)
  seen = jnp.broadcast_to(n > 0, (b, h, t))  # Rows with no visible key estimate zero.

  @jax.checkpoint  # Keep one block's gathered [b, h, blk, m, d] keys/values alive, not T's.
  def block(args):
    q_blk, idx_blk, p_blk, seen_blk = args  # [b, h, blk, d|m|m|-]
    gather = lambda x: jax.vmap(jax.vmap(lambda a, i: a[i]))(x, idx_blk)  # [b, h, blk, m, d]
    scores = jnp.einsum("bhtd,bhtmd->bhtm", q_blk, gather(k_h), preferred_element_type=f32)
    scores = scores * d**-0.5
    shift = jax.lax.stop_gradient(scores.max(-1)) if stabilise else jnp.zeros(scores.shape[:-1])
    w = jnp.where(
      seen_blk[..., None], jnp.exp(scores - shift[..., None]) / (num_samples * p_blk), 0
    )
    return jnp.einsum("bhtm,bhtmd->bhtd", w, gather(v_h)), w.sum(-1), shift

  blk = min(query_block, t)
  pad = -t % blk
  qh = q.transpose(0, 2, 1, 3)  # [b, h, t, d]

  def blocks(x, fill):  # [b, h, t, ...] -> [t // blk, b, h, blk, ...]
    x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)
    return jnp.moveaxis(x.reshape(b, h, -1, blk, *x.shape[3:]), 2, 0)

  num, den, shift = jax.lax.map(
    block, (blocks(qh, 0), blocks(idx, 0), blocks(p, 1), blocks(seen, False))
  )
  unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, h, -1, *x.shape[4:])[:, :, :t]
  return (
    unblock(num).transpose(0, 2, 1, 3),
    unblock(den).transpose(0, 2, 1),
    unblock(shift).transpose(0, 2, 1),
  )


class SampledKeyAttention(StochasticAttention):
  """Softmax attention estimated from `num_samples` importance-sampled keys per query row.

  Args:
    num_samples: Sampled keys per query row (>= the key count: exact enumeration).
    seed: Folded into the key of the samples.
    **kwargs: As for `Attention`.
  """

  variant = "sampled"
  decode_inexact = (  # For `generate`'s warning (models.decoding).
    "decoding attends exactly over the cached keys, the full forward samples num_samples keys per "
    "query; equal only when num_samples >= the sequence length"
  )

  def __init__(self, *args, num_samples: int = 32, seed: int = 0, **kwargs):
    check_int("sampled", "num_samples", num_samples, 1)
    super().__init__(*args, seed=seed, **kwargs)
    self.num_samples = num_samples

  def mix(self, q, k, v, *, segment_ids_bt=None, cache=None, cache_index=None, key=None):
    if cache is not None:  # Decoding: the shell's KV cache and exact `attend`.
      return super().mix(
        q, k, v, segment_ids_bt=segment_ids_bt, cache=cache, cache_index=cache_index
      )
    b, t = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    info = MaskInfo(pos, pos, jnp.ones((b, t), bool), segment_ids_bt, segment_ids_bt, self.causal)
    if self.num_samples >= t:
      return reference_attention(q, k, v, info.dense_mask()), None  # Every key enumerated: exact.
    key = self.call_key(None) if key is None else key
    num, den, _ = sampled_estimates(q, k, v, info, self.num_samples, key)
    out = num / jnp.maximum(den, 1e-30)[..., None]  # Rows that see nothing: 0 / 0 -> 0.
    return out.astype(q.dtype), None

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo) -> jax.Array:
    """Exact softmax attention over the KV cache (decoding only)."""
    return reference_attention(q, k, v, info.dense_mask())


@MIXERS.register("sampled")
def _sampled(cfg, *, causal: bool, rngs: nnx.Rngs) -> SampledKeyAttention:
  options = mixer_options(cfg, "sampled", DEFAULTS)
  return SampledKeyAttention(**attention_kwargs(cfg, causal=causal, rngs=rngs), **options)

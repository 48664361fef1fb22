"""KDEformer (Zandieh, Han, Daliri & Karbasi 2023, "KDEformer: Accelerating Transformers via Kernel
Density Estimation").

softmax(QKᵀ/√d)V = D⁻¹AV with A = exp(QKᵀ/√d) (masked) and D = diag(A1). KDEformer splits A into
heavy entries, computed exactly, and a residual estimated by sampling key columns:

  1. Heavy entries (the paper's practical A_spar): angular LSH with `num_projs` random hyperplanes
     hashes queries and keys to r-bit codes; both are sorted by their code's position in the
     reflected Gray order (neighbouring buckets differ in one hyperplane) and cut into blocks of
     `block_size`; query block n attends exactly to key block n.
  2. Sampling probabilities (the paper's KDE step): the approximate-matrix-multiplication
     probabilities for (D⁻¹A_res)·[V, 1] mix the squared column norms of D⁻¹A_res with the
     squared norms of the rows of [V, 1]: p_j = ½ c_j / Σc + ½ (|v_j|² + 1) / Σ(|v|² + 1), with
     c_j = Σ_i A_res,ij² / D_i² a weighted exponential kernel density of the queries at k_j. It is
     estimated by the simplest unbiased KDE estimator: `num_samples` query rows drawn uniformly,
     whose D_i are computed exactly (the paper's theory uses LSH-based KDE data structures).
  3. Residual: m = `num_samples` key columns j_1..j_m drawn i.i.d. from p, shared by every query
     (the sampling matrix Π), give unbiased estimates of each row's residual numerator and
     normaliser: Σ_s 1[(i, j_s) not heavy] A_ij_s [v_j_s, 1] / (m p_j_s).
  4. Output: (heavy + residual numerator) / (heavy + residual normaliser), the normaliser D̃
     estimated by the same samples (the ones column of [V, 1]) as in the authors' released code.

The keys' hashes, the KDE rows and the column samples depend on the queries, so which keys a query
sees exactly, and how keys are sampled, follow the attention pattern. Deviations from the paper:
padding and segment masks enter as zeros of A (a row may then see no heavy key and no sampled key
of its segment and outputs 0); p is computed from detached inputs (a proposal distribution:
gradients flow through the sampled entries, not through p). With `block_size` >= the sequence
every pair is heavy and the output is exact attention.

Bidirectional only, like the paper: the hash blocks and the shared samples are chosen from the
whole sequence, so under a causal mask a position's output would still depend on later tokens
(through which earlier keys it gets). A decoder raises an error; `sampled.py` is the causal
random-key estimator (per-row samples from each row's own prefix, query-independent proposal).

Randomness: hyperplanes, KDE rows and column samples are drawn from the call's key
(`stochastic.StochasticAttention`): fresh per training step and layer, fixed per layer in
evaluation. No decoding cache (an encoder layer).

Costs: O(T·(B + 2m)·d) time for B = block_size; memory O(T·(B + m)) scores per head.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.attention.base import (
  NEG_INF,
  MaskInfo,
  attention_kwargs,
  reference_attention,
)
from reslm.models.attention.stochastic import StochasticAttention
from reslm.models.registry import MIXERS, check_int, mixer_options

DEFAULTS = {"num_samples": 32, "block_size": 64, "num_projs": 4, "seed": 0}


def gray_rank(code: jax.Array, bits: int) -> jax.Array:
  """Each `bits`-bit code's index in the reflected Gray sequence (the inverse Gray code)."""
  rank, shift = code, 1
  while shift < bits:
    rank = rank ^ (rank >> shift)
    shift *= 2
  return rank


def angular_hash(x: jax.Array, planes: jax.Array) -> jax.Array:
  """Gray-order ranks int32 [b, h, n] of vectors [b, h, n, d] under hyperplanes [h, d, r]."""
  bits = planes.shape[-1]
  side = jnp.einsum("bhnd,hdr->bhnr", x.astype(jnp.float32), planes) > 0
  code = jnp.sum(side.astype(jnp.int32) << jnp.arange(bits, dtype=jnp.int32), -1)
  return gray_rank(code, bits)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [b|1, h|1, n, ...] gathered along n at int idx [b|1, h|1, *shape] -> [b, h, *shape, ...].

  Indices are clipped into range (callers mask out-of-range padding slots themselves).
  """
  b, h = max(x.shape[0], idx.shape[0]), max(x.shape[1], idx.shape[1])
  x = jnp.broadcast_to(x, (b, h, *x.shape[2:]))
  flat = jnp.broadcast_to(idx, (b, h, *idx.shape[2:])).reshape(b, h, -1)
  flat = jnp.clip(flat, 0, x.shape[2] - 1)
  out = jnp.take_along_axis(x, flat.reshape(*flat.shape, *(1,) * (x.ndim - 3)), 2)
  return out.reshape(b, h, *idx.shape[2:], *x.shape[3:])


def pair_visible(info: MaskInfo, qi: jax.Array, kj: jax.Array) -> jax.Array:
  """Whether query qi may see key kj; qi, kj int index arrays [b, h, ...] that broadcast."""
  per_head = lambda a: a[:, None]  # noqa: E731  [b, n] -> [b, 1, n]
  ok = _take(per_head(info.kv_valid), kj)
  if info.causal:
    ok = ok & (_take(per_head(info.kv_pos), kj) <= _take(per_head(info.q_pos), qi))
  if info.q_seg is not None:
    ok = ok & (_take(per_head(info.q_seg), qi) == _take(per_head(info.kv_seg), kj))
  return ok


def lsh_blocks(q, k, kv_valid, planes, block_size: int):
  """Sorts queries and keys [b, h, t, d] by Gray-order hash rank and cuts them into blocks.

  Returns:
    (order_q, order_k): [b, h, L] token index in each sorted slot (L = t padded to whole blocks;
    padding slots hold t, an index past the end); (block_q, block_k): [b, h, t] the block of each
    query and key (a query and key of equal block form a heavy pair).
  """
  b, h, t = q.shape[:3]
  pad = -t % block_size
  rank_q = angular_hash(q, planes)
  rank_k = jnp.where(kv_valid[:, None], angular_hash(k, planes), 2 ** planes.shape[-1])
  order_q = jnp.argsort(rank_q, axis=-1, stable=True)  # Ties in position order.
  order_k = jnp.argsort(rank_k, axis=-1, stable=True)
  block_q = jnp.argsort(order_q, axis=-1) // block_size
  block_k = jnp.argsort(order_k, axis=-1) // block_size
  fill = jnp.full((b, h, pad), t, jnp.int32)
  order_q, order_k = (jnp.concatenate([o.astype(jnp.int32), fill], -1) for o in (order_q, order_k))
  return (order_q, order_k), (block_q, block_k)


def column_norm_estimate(q, k, info: MaskInfo, rows, block_q, block_k) -> jax.Array:
  """Unbiased estimate of c_j = Σ_i A_res,ij² / D_i² from the query rows `rows` [b, h, r].

  Args:
    q: Scaled queries [b, h, t, d]; k: keys [b, h, t, d].
    info: The mask.
    rows: Uniformly drawn query indices [b, h, r].
    block_q, block_k: [b, h, t] blocks of the heavy pairs (excluded from A_res).

  Returns:
    [b, h, t] float32 (t / r) Σ_{i in rows} 1[(i, j) visible, not heavy] (A_ij / D_i)².
  """
  t = q.shape[2]
  keys = jnp.arange(t)[None, None, None, :]
  q_rows = _take(q, rows)  # [b, h, r, d]
  scores = jnp.einsum("bhrd,bhsd->bhrs", q_rows, k, preferred_element_type=jnp.float32)
  seen = pair_visible(info, rows[..., None], keys)  # [b, h, r, s]
  log_d = jax.nn.logsumexp(jnp.where(seen, scores, NEG_INF), -1, keepdims=True)  # Exact log D_i.
  residual = seen & (_take(block_q, rows)[..., None] != block_k[:, :, None, :])
  terms = jnp.where(residual, jnp.exp(2.0 * (scores - log_d)), 0.0)
  return terms.sum(2) * (t / rows.shape[-1])


def sampling_probabilities(col_norms, v, kv_valid) -> jax.Array:
  """p_j = ½ c_j / Σc + ½ (|v_j|² + 1) / Σ(|v|² + 1) over valid keys; [b, h, t] float32.

  The value half alone when every column-norm estimate is 0 (e.g. all pairs heavy).
  """
  w = jnp.where(kv_valid[:, None], jnp.sum(jnp.square(v.astype(jnp.float32)), -1) + 1.0, 0.0)
  w = w / w.sum(-1, keepdims=True)
  total = col_norms.sum(-1, keepdims=True)
  mixed = 0.5 * col_norms / jnp.where(total > 0, total, 1.0) + 0.5 * w
  return jnp.where(total > 0, mixed, w)


def kdeformer_estimates(
  q,
  k,
  v,
  info: MaskInfo,
  keys,
  *,
  num_samples: int,
  block_size: int,
  num_projs: int,
  stabilise=True,
):
  """KDEformer's numerator and normaliser estimates of softmax self-attention.

  Any `info` mask works (the layer passes bidirectional ones; a causal mask is honoured entry-wise,
  but the blocks and samples still depend on the whole sequence).

  Args:
    q: Queries [b, t, h, d]; k, v: keys/values [b, t, kv_heads, d] (self-attention: t keys).
    info: Which keys each query may see.
    keys: PRNG keys (hyperplanes, KDE rows, column samples).
    num_samples: Sampled key columns m, also the number of KDE query rows (0: heavy part only).
    block_size: Keys (and queries) per LSH block.
    num_projs: Hyperplanes of the angular hash.
    stabilise: Scale both estimates by exp(-shift), shift the row's largest visible heavy or
      sampled score (cancels in the ratio); False: shift 0 (for checking unbiasedness).

  Returns:
    (numerator [b, t, h, d], normaliser [b, t, h], shift [b, t, h]) float32: estimates of
    Σ_j A_ij v_j and Σ_j A_ij, each times exp(-shift).
  """
  hash_key, kde_key, sample_key = keys
  b, t, h, d = q.shape
  rep = h // k.shape[2]
  f32 = jnp.float32
  qs = (q.astype(f32) * d**-0.5).transpose(0, 2, 1, 3)  # [b, h, t, d]
  kh = jnp.repeat(k.astype(f32), rep, axis=2).transpose(0, 2, 1, 3)
  vh = jnp.repeat(v.astype(f32), rep, axis=2).transpose(0, 2, 1, 3)
  planes = jax.random.normal(hash_key, (h, d, num_projs), f32)
  (order_q, order_k), (block_q, block_k) = lsh_blocks(qs, kh, info.kv_valid, planes, block_size)
  n = order_q.shape[-1] // block_size

  # Heavy pairs: query block n with key block n, in sorted layout [b, h, n, B, ...].
  blocks = lambda x, order: _take(x, order.reshape(b, h, n, block_size))  # noqa: E731
  heavy_seen = (
    pair_visible(
      info, order_q.reshape(b, h, n, block_size, 1), order_k.reshape(b, h, n, 1, block_size)
    )
    & (order_q.reshape(b, h, n, block_size, 1) < t)
    & (order_k.reshape(b, h, n, 1, block_size) < t)
  )
  heavy = jnp.einsum("bhnid,bhnjd->bhnij", blocks(qs, order_q), blocks(kh, order_k))
  heavy = jnp.where(heavy_seen, heavy, NEG_INF)
  where_q = jnp.argsort(order_q[..., :t], axis=-1)  # Sorted slot of each query.
  heavy_max = _take(heavy.max(-1).reshape(b, h, -1), where_q)  # [b, h, t]

  if num_samples:
    rows = jax.random.randint(kde_key, (b, h, num_samples), 0, t)
    stop = jax.lax.stop_gradient
    col = column_norm_estimate(stop(qs), stop(kh), info, rows, block_q, block_k)
    p = sampling_probabilities(col, stop(vh), info.kv_valid)  # [b, h, t]
    idx = jax.random.categorical(sample_key, jnp.log(p), shape=(num_samples, b, h))
    idx = jnp.moveaxis(idx, 0, -1)  # [b, h, m]
    sampled = jnp.einsum("bhtd,bhmd->bhtm", qs, _take(kh, idx))
    sampled_seen = pair_visible(info, jnp.arange(t)[None, None, :, None], idx[:, :, None, :])
    sampled_seen &= block_q[..., None] != _take(block_k, idx)[:, :, None, :]
    sampled = jnp.where(sampled_seen, sampled, NEG_INF)
    row_max = jnp.maximum(heavy_max, sampled.max(-1))
  else:
    row_max = heavy_max
  shift = jax.lax.stop_gradient(row_max) if stabilise else jnp.zeros_like(row_max)

  w = jnp.where(
    heavy_seen, jnp.exp(heavy - _take(shift, order_q.reshape(b, h, n, block_size, 1))), 0
  )
  num = jnp.einsum("bhnij,bhnje->bhnie", w, blocks(vh, order_k))
  num = _take(num.reshape(b, h, n * block_size, -1), where_q)
  den = _take(w.sum(-1).reshape(b, h, -1), where_q)
  if num_samples:
    p_idx = _take(p, idx)[:, :, None, :]  # [b, h, 1, m]
    w = jnp.where(sampled_seen, jnp.exp(sampled - shift[..., None]) / (num_samples * p_idx), 0)
    num = num + jnp.einsum("bhtm,bhme->bhte", w, _take(vh, idx))
    den = den + w.sum(-1)
  return num.transpose(0, 2, 1, 3), den.transpose(0, 2, 1), shift.transpose(0, 2, 1)


class KDEAttention(StochasticAttention):
  """KDEformer (bidirectional): LSH-found heavy blocks exactly plus KDE-guided column samples.

  Args:
    num_samples: Sampled key columns (and KDE query rows) per head; 0 = heavy blocks only.
    block_size: Queries and keys per LSH block (>= the sequence: exact attention).
    num_projs: Hyperplanes of the angular LSH (2^num_projs buckets).
    seed: Folded into the key of the hashes and samples.
    **kwargs: As for `Attention`.
  """

  variant = "kde"
  decode_inexact = (  # For `generate`'s warning (models.decoding).
    "KDEformer is bidirectional (encoder only): it has no cached decoding"
  )

  def __init__(self, *args, num_samples=32, block_size=64, num_projs=4, seed=0, **kwargs):
    check_int("kde", "num_samples", num_samples, 0)
    check_int("kde", "block_size", block_size, 1)
    check_int("kde", "num_projs", num_projs, 1)
    if num_projs > 24:  # Codes and ranks stay int32.
      raise ValueError(f"num_projs={num_projs} is not allowed for kde: an integer in 1..24")
    if kwargs.get("causal", True):
      raise ValueError(
        "kde (KDEformer) attention is bidirectional only: its hash blocks and column samples are "
        "chosen from the whole sequence, so a position would depend on later tokens; a causal "
        "(decoder) model can use mixer 'sampled' (per-row random-key importance sampling)"
      )
    super().__init__(*args, seed=seed, **kwargs)
    self.num_samples, self.block_size, self.num_projs = num_samples, block_size, num_projs

  def mix(self, q, k, v, *, segment_ids_bt=None, cache=None, cache_index=None, key=None):
    del cache_index
    if cache is not None:
      raise ValueError("kde (KDEformer) attention is bidirectional and has no decoding cache")
    b, t = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    info = MaskInfo(pos, pos, jnp.ones((b, t), bool), segment_ids_bt, segment_ids_bt, self.causal)
    if self.block_size >= t:
      return reference_attention(q, k, v, info.dense_mask()), None  # One block: every pair exact.
    key = self.call_key(None) if key is None else key
    num, den, _ = kdeformer_estimates(
      q,
      k,
      v,
      info,
      tuple(jax.random.split(key, 3)),
      num_samples=self.num_samples,
      block_size=self.block_size,
      num_projs=self.num_projs,
    )
    out = num / jnp.where(den > 0, den, 1.0)[..., None]  # Rows with no estimate output 0.
    return out.astype(q.dtype), None


@MIXERS.register("kde")
def _kde(cfg, *, causal: bool, rngs: nnx.Rngs) -> KDEAttention:
  options = mixer_options(cfg, "kde", DEFAULTS)
  return KDEAttention(**attention_kwargs(cfg, causal=causal, rngs=rngs), **options)

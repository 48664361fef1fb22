"""Reformer LSH attention (Kitaev, Kaiser & Levskaya 2020, "Reformer: The Efficient Transformer").

Algorithm (per head and hash round):
  1. Shared-QK: keys are the unit-normalised queries, k̂ = q / |q| (the shell's `k` projection is
     ignored; with grouped-query heads each query head keeps its own keys and shares its kv
     head's values).
  2. Angular LSH: bucket(x) = argmax([x̂R; -x̂R]) with a random rotation R [head_dim, buckets/2].
  3. Sort tokens by (bucket, position) and cut the sorted order into chunks of `chunk_size`;
     every query attends to the keys of its own bucket in its chunk and the previous chunk.
  4. A query never attends to itself unless no other key is visible (its score is replaced by
     -1e5, Reformer's rule, so it only counts when it is the sole candidate in every round).
  5. Causal masking uses the original positions; results are unsorted back to positions and the
     `num_hashes` rounds are combined with weights softmax over rounds of each round's
     log-sum-exp.

Bucket-aligned chunks: each bucket starts a new chunk (buckets are padded to whole chunks), so the
chunk a token falls in depends only on the earlier tokens of its bucket. The causal model is then
strictly causal; with Reformer's unaligned chunks a future token's bucket shifts chunk boundaries.

Randomness: as in Reformer, the rotations (one [head_dim, buckets/2] matrix per head and hash
round) are drawn afresh from the call's key (`stochastic.StochasticAttention`): in training a new key per
step and layer, so no layer sees the same hashing twice; in evaluation a fixed key per layer, so
results are deterministic. Under the scanned layer stack each layer's key comes from its index.

Decoding (with a KV cache, prefill included) is exact shared-QK attention over the cache with the
same self rule and uses no rotations: it equals the full forward when one hash round in one bucket
covers every position (`num_buckets=1`, `chunk_size >= max_len`), and is a dense fallback otherwise.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.attention.base import NEG_INF, MaskInfo, attention_kwargs
from reslm.models.attention.stochastic import StochasticAttention
from reslm.models.registry import MIXERS, mixer_options

SELF_SCORE = -1e5  # Reformer's self-attention score: negligible unless it is the only candidate.
DEFAULTS = {"num_buckets": 8, "num_hashes": 1, "chunk_size": 64, "seed": 0}


def normalise(x: jax.Array) -> jax.Array:
  """Unit vectors along the last axis (the shared-QK keys)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + 1e-12)).astype(x.dtype)


def random_rotations(key: jax.Array, heads: int, head_dim: int, rounds: int, buckets: int):
  """The LSH rotations [heads, head_dim, rounds, buckets // 2]: i.i.d. N(0, 1) from `key`."""
  return jax.random.normal(key, (heads, head_dim, rounds, max(buckets // 2, 1)), jnp.float32)


def hash_buckets(k_hat: jax.Array, rotations: jax.Array, num_buckets: int) -> jax.Array:
  """Bucket ids int32 [b, heads, rounds, t] of keys [b, heads, t, d]."""
  b, h, t, _ = k_hat.shape
  rounds = rotations.shape[2]
  if num_buckets == 1:
    return jnp.zeros((b, h, rounds, t), jnp.int32)
  proj = jnp.einsum("bhtd,hdrn->bhrtn", k_hat.astype(jnp.float32), rotations)
  return jnp.argmax(jnp.concatenate([proj, -proj], -1), -1).astype(jnp.int32)


class LSHAttention(StochasticAttention):
  """Shared-QK attention restricted to LSH buckets and neighbouring sorted chunks.

  Args:
    num_buckets: Hash buckets per round; 1 or an even number.
    num_hashes: Hash rounds combined by their log-sum-exp.
    chunk_size: Sorted-chunk length; each query sees its chunk and the previous one.
    seed: Folded into the key of the random rotations.
    **kwargs: As for `Attention`.
  """

  variant = "lsh"
  decode_inexact = (  # For `generate`'s warning (models.decoding).
    "decoding attends densely over the cached keys (shared-QK softmax), not within LSH buckets; "
    "equal only with num_buckets=1 and chunk_size >= the sequence length"
  )

  def __init__(self, *args, num_buckets=8, num_hashes=1, chunk_size=64, seed=0, **kwargs):
    checks = (
      ("num_buckets", num_buckets, lambda n: n == 1 or (n >= 2 and n % 2 == 0), "1 or even >= 2"),
      ("num_hashes", num_hashes, lambda n: n >= 1, ">= 1"),
      ("chunk_size", chunk_size, lambda n: n >= 1, ">= 1"),
    )
    for name, value, ok, allowed in checks:
      if not isinstance(value, int) or isinstance(value, bool) or not ok(value):
        raise ValueError(f"{name}={value!r} is not allowed for lsh: an integer, {allowed}")
    super().__init__(*args, seed=seed, **kwargs)
    self.num_buckets = num_buckets
    self.num_hashes = num_hashes
    self.chunk_size = chunk_size

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """Shared-QK keys and values per query head, {"k", "v"}: [batch, max_len, heads, head_dim]."""
    shape = (batch, max_len, self.num_heads, self.head_dim)
    dtype = dtype or self.dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def mix(self, q, k, v, *, segment_ids_bt=None, cache=None, cache_index=None, key=None):
    del k  # Shared-QK: the keys are the normalised queries.
    v = jnp.repeat(v, self.num_heads // self.num_kv_heads, axis=2)  # [b, t, h, d]
    if cache is None:
      b, t = q.shape[:2]
      pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      info = MaskInfo(pos, pos, jnp.ones((b, t), bool), segment_ids_bt, segment_ids_bt, self.causal)
      key = self.call_key(None) if key is None else key
      return self.lsh(q, normalise(q), v, info, key), None
    # Decoding: the shell writes the cache and calls `attend`, the dense fallback.
    return super().mix(
      q, normalise(q), v, segment_ids_bt=segment_ids_bt, cache=cache, cache_index=cache_index
    )

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo) -> jax.Array:
    """Dense shared-QK attention over the KV cache (decoding only)."""
    return dense_shared_qk(q, k, v, info)

  def lsh(self, q, k, v, info: MaskInfo, key: jax.Array) -> jax.Array:
    """LSH attention of queries [b, t, h, d] over shared-QK keys and values [b, t, h, d].

    The rotations are drawn from `key` (one per head and hash round).
    """
    b, t, h, d = q.shape
    c, nb, r = self.chunk_size, self.num_buckets, self.num_hashes
    rot = random_rotations(key, h, d, r, nb)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [b, h, t, d]
    buckets = hash_buckets(k, rot, nb)  # [b, h, r, t]

    # Sort by (bucket, position); then lay each bucket out from a chunk boundary.
    order = jnp.argsort(buckets * t + jnp.arange(t), axis=-1)  # [b, h, r, t]
    sorted_b = jnp.take_along_axis(buckets, order, -1)
    counts = jnp.sum(jax.nn.one_hot(buckets, nb, dtype=jnp.int32), axis=-2)  # [b, h, r, nb]
    start = jnp.cumsum(counts, -1) - counts  # First sorted index of each bucket.
    padded = -(-counts // c) * c
    aligned = jnp.cumsum(padded, -1) - padded  # First layout slot of each bucket.
    rank = jnp.arange(t) - jnp.take_along_axis(start, sorted_b, -1)
    slot = jnp.take_along_axis(aligned, sorted_b, -1) + rank  # [b, h, r, t]
    n_chunks = -(-(t + nb * (c - 1)) // c)
    length = n_chunks * c
    lead = jnp.indices((b, h, r, 1), sparse=True)[:3]
    token = jnp.full((b, h, r, length), t, jnp.int32).at[(*lead, slot)].set(order)  # t = empty

    def gather(x):  # [b, h, t, ...] -> [b, h, r, n, c, ...] in layout order (empty slots: 0).
      x = jnp.concatenate([x, jnp.zeros_like(x[:, :, :1])], 2)
      idx = token.reshape(b, h, r * length, *(1,) * (x.ndim - 3))
      out = jnp.take_along_axis(x, idx, 2)
      return out.reshape(b, h, r, n_chunks, c, *x.shape[3:])

    def look_back(x):  # [b, h, r, n, c, ...] -> the previous chunk and this one, [.., 2c, ...].
      return jnp.concatenate([jnp.roll(x, 1, axis=3), x], axis=4)

    valid = token < t
    pad = lambda a: jnp.broadcast_to(a[:, None], (b, h, t))  # noqa: E731
    qpos = gather(pad(info.q_pos))
    kpos = look_back(gather(pad(info.kv_pos)))
    idx_c = gather(jnp.broadcast_to(jnp.arange(t), (b, h, t)))
    bucket_c = jnp.take_along_axis(
      jnp.concatenate([buckets, jnp.full((b, h, r, 1), -1, jnp.int32)], -1), token, -1
    ).reshape(b, h, r, n_chunks, c)  # Empty slots: bucket -1.
    # Chunk 0 has no previous chunk (no wrap-around), so no key is seen twice.
    first = (jnp.arange(2 * c) >= c)[None, :] | (jnp.arange(n_chunks) > 0)[:, None]  # [n, 2c]
    key_ok = look_back(valid.reshape(b, h, r, n_chunks, c)) & first
    mask = key_ok[..., None, :] & (bucket_c[..., :, None] == look_back(bucket_c)[..., None, :])
    if info.causal:
      mask &= kpos[..., None, :] <= qpos[..., :, None]
    if info.q_seg is not None:
      seg_q = gather(pad(info.q_seg))
      mask &= seg_q[..., :, None] == look_back(gather(pad(info.kv_seg)))[..., None, :]
    is_self = idx_c[..., :, None] == look_back(idx_c)[..., None, :]

    qc, kc, vc = gather(q), look_back(gather(k)), look_back(gather(v))  # [b, h, r, n, c|2c, d]
    scores = jnp.einsum("bhrnqd,bhrnkd->bhrnqk", qc, kc, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * d**-0.5, NEG_INF)
    scores = jnp.where(mask & is_self, SELF_SCORE, scores)
    lse = jax.nn.logsumexp(scores, -1)  # [b, h, r, n, c]
    probs = jnp.exp(scores - lse[..., None])
    out = jnp.einsum("bhrnqk,bhrnkd->bhrnqd", probs.astype(vc.dtype), vc)
    out = out * mask.any(-1)[..., None].astype(out.dtype)

    # Back to positions: each token's layout slot, then combine rounds by log-sum-exp weights.
    where_tok = jnp.zeros((b, h, r, t), jnp.int32).at[(*lead, order)].set(slot)
    out = jnp.take_along_axis(out.reshape(b, h, r, length, d), where_tok[..., None], 3)
    lse = jnp.take_along_axis(lse.reshape(b, h, r, length), where_tok, 3)
    weights = jax.nn.softmax(lse, axis=2)[..., None].astype(out.dtype)  # [b, h, r, t, 1]
    out = jnp.sum(out * weights, axis=2)  # [b, h, t, d]
    return out.transpose(0, 2, 1, 3)


def dense_shared_qk(q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo) -> jax.Array:
  """Exact shared-QK attention with Reformer's self rule; keys/values per query head."""
  d = q.shape[-1]
  mask = info.dense_mask()[:, None]  # [b, 1, t, s]
  is_self = (info.q_pos[:, :, None] == info.kv_pos[:, None, :])[:, None]
  scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * d**-0.5
  scores = jnp.where(mask, scores, NEG_INF)
  scores = jnp.where(mask & is_self, SELF_SCORE, scores)
  probs = jax.nn.softmax(scores, -1)
  out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)
  return out * mask.any(-1).transpose(0, 2, 1)[..., None].astype(out.dtype)


@MIXERS.register("lsh")
def _lsh(cfg, *, causal: bool, rngs: nnx.Rngs) -> LSHAttention:
  options = mixer_options(cfg, "lsh", DEFAULTS)
  return LSHAttention(**attention_kwargs(cfg, causal=causal, rngs=rngs), **options)

"""KDEformer-style sampled attention (Zandieh et al. 2023, "KDEformer: Accelerating Transformers
via Kernel Density Estimation").

softmax(QKᵀ/√d)V = D⁻¹AV with A = exp(QKᵀ/√d) and D = diag(A1). Both the numerator row
(AV)_i = Σ_j A_ij v_j and the denominator D_i = Σ_j A_ij are estimated by importance sampling m
key columns per query row: with j_1..j_m drawn i.i.d. from p_i over the visible keys,

  (AV)_i ≈ (1/m) Σ_s A_ij_s v_j_s / p_ij_s,    D_i ≈ (1/m) Σ_s A_ij_s / p_ij_s,

which are unbiased; their ratio is a consistent estimate of the attention output. The sampling
distribution is a cheap, query-independent stand-in for KDEformer's estimated row weights: an equal
mixture of the uniform distribution over the visible keys and one proportional to |k_j|·|v_j|
(large keys tend to dominate A, large values dominate AV). Causal masking restricts it to the
visible keys, so a row never samples the future. With `num_samples` >= the number of keys every
key is enumerated once instead (weight 1), which is exact attention.

Costs: O(T·m·d) time; memory O(T·m) for the sample indices plus one block of queries' gathered
keys/values (rematerialised in the backward pass). Without segment ids the visible keys of every
row form a prefix, so one cumulative table [b, heads, s] serves all rows (uniform draws need no
table at all); with segment ids the tables are per row, [b, heads, t, s] scalars.

Randomness: samples come from `jax.random.key(seed)` folded with the key and query lengths, so they
are fixed per layer and shape and need no rngs stream. Decoding goes through the shell's KV cache;
it equals the full forward only in the exact (enumerating) regime.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.attention.base import Attention, MaskInfo, attention_kwargs, reference_attention
from reslm.models.registry import MIXERS, mixer_options

DEFAULTS = {"num_samples": 32, "seed": 0}


def _sample(cum: jax.Array, target: jax.Array) -> jax.Array:
  """Inverse-CDF lookup: first index whose cumulative weight exceeds target, over the last axis."""
  search = lambda c, x: jnp.searchsorted(c, x, side="right")  # noqa: E731
  for _ in range(cum.ndim - 1):
    search = jax.vmap(search)
  return search(cum, target)


def kde_estimates(
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


class KDEAttention(Attention):
  """Softmax attention estimated from `num_samples` importance-sampled keys per query.

  Args:
    num_samples: Sampled keys per query row (>= the key count: exact enumeration).
    seed: Seed of the samples.
    **kwargs: As for `Attention`.
  """

  decode_inexact = (  # For `generate`'s warning (models.decoding).
    "cached decoding does not reproduce the full forward's sampled estimate (equal only when "
    "num_samples enumerates every key)"
  )

  def __init__(self, *args, num_samples: int = 32, seed: int = 0, **kwargs):
    for name, value, ok, allowed in (
      ("num_samples", num_samples, isinstance(num_samples, int) and num_samples >= 1, ">= 1"),
      ("seed", seed, isinstance(seed, int), "any integer"),
    ):
      if not ok or isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not allowed for kde: an integer {allowed}")
    super().__init__(*args, **kwargs)
    self.num_samples = num_samples
    self.seed = seed

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo) -> jax.Array:
    t, s = q.shape[1], k.shape[1]
    if self.num_samples >= s:
      return reference_attention(q, k, v, info.dense_mask())  # Every key enumerated: exact.
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), s), t)
    num, den, _ = kde_estimates(q, k, v, info, self.num_samples, key)
    out = num / jnp.maximum(den, 1e-30)[..., None]  # Rows that see nothing: 0 / 0 -> 0.
    return out.astype(q.dtype)


@MIXERS.register("kde")
def _kde(cfg, *, causal: bool, rngs: nnx.Rngs) -> KDEAttention:
  options = mixer_options(cfg, "kde", DEFAULTS)
  return KDEAttention(**attention_kwargs(cfg, causal=causal, rngs=rngs), **options)

"""Attention Free Transformer (Zhai et al. 2021, "An Attention Free Transformer").

Algorithm: per channel c (heads × head_dim), with learned pairwise position biases w,
  Y_tc = σ(Q_tc) · Σ_{t'} exp(K_t'c + w_tt') V_t'c / Σ_{t'} exp(K_t'c + w_tt'),
sums over the positions t' that t may see (t' <= t when causal).

* "full": w is a learned [max_len, max_len] parameter. Computed with the paper's factorisation
  exp(K + w) = exp(w) exp(K): two [T, T] × [T, channels] products, stabilised by subtracting the
  row max of w and the (stop-gradient) per-channel max of K, which cancel in the ratio. O(T² d).
* "local": as "full" but w is zeroed (not masked) where |t - t'| >= window.
* "simple": no w, so the weights are a softmax of K over the sequence per channel, O(T d). The
  causal form is a prefix softmax: an associative scan (within chunks, then across chunk totals)
  over (running max m, Z = Σ exp(K - m), N = Σ exp(K - m) V), each merge rescaling by
  exp(m_old - m_new). Decoding carries (m, Z, N)
  [b, kv_heads, d], a constant-size state (a zero state is read as empty).

"full"/"local" decode with the shell's KV cache (the biases need every earlier key). Keys and values
use kv_heads; their per-channel mix is shared by the query heads of a group, so it is computed once
per kv head and repeated. "simple" treats segment ids as a padding mask only; "full"/"local" honour
packed segments through the shell's mask.

Positions: the paper's only position information is w ("full"/"local"; none in "simple"): σ(Q)
and exp(K) see un-rotated projections by default. `rope=True` applies RoPE to q and k first (not
in the paper).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.attention.base import NEG_INF, Attention, MaskInfo
from reslm.models.attention.linear import position_free_kwargs
from reslm.models.registry import MIXERS, mixer_options
from reslm.models.sharding import param

VARIANTS = ("full", "local", "simple")


def _gate(q: jax.Array, y: jax.Array) -> jax.Array:
  """σ(Q) ⊙ Y with Y [b, t, kv_heads, d] repeated over each group of query heads."""
  y = jnp.repeat(y, q.shape[2] // y.shape[2], axis=2)  # [b, t, h, d]
  return jax.nn.sigmoid(q.astype(jnp.float32)) * y


def aft_pairwise(q, k, v, bias, mask) -> jax.Array:
  """AFT with pairwise biases, via the exp(w) exp(K) factorisation.

  Args:
    q: [b, tq, h, d]; k, v: [b, tk, kv_heads, d].
    bias: Position biases w, [b, tq, tk].
    mask: Bool [b, tq, tk], which keys each query sees; rows with none output zeros.

  Returns:
    [b, tq, h, d] float32.
  """
  k, v, bias = k.astype(jnp.float32), v.astype(jnp.float32), bias.astype(jnp.float32)
  row_max = jax.lax.stop_gradient(jnp.max(jnp.where(mask, bias, NEG_INF), -1, keepdims=True))
  ew = jnp.exp(jnp.where(mask, bias - row_max, NEG_INF))  # [b, tq, tk], 0 where hidden
  key_seen = mask.any(axis=1)[:, :, None, None]  # [b, tk, 1, 1]
  k_max = jax.lax.stop_gradient(jnp.max(jnp.where(key_seen, k, NEG_INF), 1, keepdims=True))
  ek = jnp.exp(jnp.where(key_seen, k - k_max, NEG_INF))  # [b, tk, g, d]
  num = jnp.einsum("bts,bsgd->btgd", ew, ek * v)
  den = jnp.einsum("bts,bsgd->btgd", ew, ek)
  return _gate(q, num / jnp.where(den > 0, den, 1.0))


def _merge(a, b):
  """Combines two (m, Z, N) prefix summaries, a before b."""
  m = jnp.maximum(a[0], b[0])
  sa, sb = jnp.exp(a[0] - m), jnp.exp(b[0] - m)
  return m, a[1] * sa + b[1] * sb, a[2] * sa + b[2] * sb


def _prefix_summaries(m, z, n, chunk: int = 64):
  """Inclusive prefix merge of per-token (m, Z, N) summaries along axis 1, [b, t, g, d] each.

  Two levels, each an exact `associative_scan`: within chunks of `chunk` tokens (all chunks at
  once), then across the chunk totals; each token then merges its chunk's exclusive prefix. Same
  result as one scan over t, but shallower and with less temporary memory on long sequences.
  """
  b, t = m.shape[:2]
  pad = -t % chunk

  def chunked(x, fill):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape(b, -1, chunk, *x.shape[2:])  # [b, chunks, chunk, g, d]

  local = jax.lax.associative_scan(
    _merge, (chunked(m, NEG_INF), chunked(z, 0.0), chunked(n, 0.0)), axis=2
  )
  totals = jax.lax.associative_scan(_merge, tuple(x[:, :, -1] for x in local), axis=1)

  def shift(x, fill):  # Exclusive prefix: chunk i sees the totals of chunks < i.
    return jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)[:, :, None]

  before = (shift(totals[0], NEG_INF), shift(totals[1], 0.0), shift(totals[2], 0.0))
  merged = _merge(before, local)
  return tuple(x.reshape(b, -1, *x.shape[3:])[:, :t] for x in merged)


def aft_simple(q, k, v, *, causal, valid=None, state=None):
  """AFT-simple: σ(Q) ⊙ (softmax over the (prefix of the) sequence of K, per channel) ⊙ V summed.

  Args:
    q: [b, t, h, d]; k, v: [b, t, kv_heads, d].
    causal: Prefix (True) or whole-sequence (False) softmax.
    valid: Optional bool [b, t], False at padding.
    state: Optional (m, Z, N), each [b, kv_heads, d], from earlier tokens (causal only).

  Returns:
    (output [b, t, h, d] float32, final state (m, Z, N) or None when not causal).
  """
  b, t = q.shape[:2]
  k, v = k.astype(jnp.float32), v.astype(jnp.float32)
  ok = (jnp.ones((b, t), bool) if valid is None else valid)[:, :, None, None]
  # Each token as a one-element summary; padding is an empty one (m = -inf, Z = N = 0).
  m = jax.lax.stop_gradient(jnp.where(ok, k, NEG_INF))
  z = jnp.where(ok, jnp.exp(jnp.where(ok, k - m, 0.0)), 0.0)  # 1 at real tokens, keeps k's grad
  n = z * v
  if not causal:
    m_all = jnp.max(m, axis=1, keepdims=True)
    scale = jnp.exp(m - m_all)
    z, n = (z * scale).sum(1, keepdims=True), (n * scale).sum(1, keepdims=True)
    y = n / jnp.where(z > 0, z, 1.0)
    return _gate(q, jnp.broadcast_to(y, k.shape)) * ok[..., 0, 0][:, :, None, None], None
  m, z, n = _prefix_summaries(m, z, n)  # [b, t, g, d] each
  if state is not None:
    m0, z0, n0 = (s.astype(jnp.float32) for s in state)
    m0 = jnp.where(z0 > 0, m0, NEG_INF)  # A zero state is empty.
    m, z, n = _merge((m0[:, None], z0[:, None], n0[:, None]), (m, z, n))
  y = n / jnp.where(z > 0, z, 1.0)
  return _gate(q, y) * ok[..., 0, 0][:, :, None, None], (m[:, -1], z[:, -1], n[:, -1])


class AFTAttention(Attention):
  """The Attention Free Transformer's mixing on the shell's q/k/v projections.

  Args:
    variant: "full", "local" or "simple".
    window: Width of the learned-bias band for "local" (|t - t'| < window).
    max_len: Longest sequence for the [max_len, max_len] biases of "full"/"local".
    **kwargs: As for `Attention`.
  """

  def __init__(self, *args, variant="full", window=32, max_len=2048, **kwargs):
    if variant not in VARIANTS:
      raise ValueError(
        f"variant={variant!r} is not an AFT variant; choose one of: {', '.join(VARIANTS)}"
      )
    for key, value in (("window", window), ("max_len", max_len)):
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
          f"{key}={value!r} is not allowed for 'aft' attention; it must be a positive integer"
        )
    super().__init__(*args, **kwargs)
    self.variant, self.window, self.max_len = variant, window, max_len
    if variant != "simple":
      dtype = kwargs.get("param_dtype", jnp.float32)
      self.w = param(jnp.zeros((max_len, max_len), dtype), (None, None))

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """ "simple": zero (m, z, n) [b, kv_heads, d], independent of max_len; else the KV cache."""
    if self.variant != "simple":
      return super().init_cache(batch, max_len, dtype)
    zeros = jnp.zeros((batch, self.num_kv_heads, self.head_dim), jnp.float32)
    return {"m": zeros, "z": zeros, "n": zeros}

  def mix(self, q, k, v, *, segment_ids_bt=None, cache=None, cache_index=None):
    if self.variant != "simple":
      return super().mix(
        q, k, v, segment_ids_bt=segment_ids_bt, cache=cache, cache_index=cache_index
      )
    del cache_index  # The recurrent state already summarises every earlier token.
    if cache is not None and (segment_ids_bt is not None or not self.causal):
      raise ValueError("aft-simple decodes only causally and without segment_ids")
    valid = None if segment_ids_bt is None else segment_ids_bt != 0
    state = None if cache is None else (cache["m"], cache["z"], cache["n"])
    out, state = aft_simple(q, k, v, causal=self.causal, valid=valid, state=state)
    new_cache = None if cache is None else dict(zip(("m", "z", "n"), state, strict=True))
    return out.astype(q.dtype), new_cache

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo) -> jax.Array:
    if k.shape[1] > self.max_len:
      raise ValueError(f"AFT sees {k.shape[1]} key positions but max_len={self.max_len}")
    q_pos, kv_pos = info.q_pos[:, :, None], info.kv_pos[:, None, :]
    bias = self.w[...][q_pos, kv_pos]  # [b, tq, tk]
    if self.variant == "local":
      bias = jnp.where(jnp.abs(q_pos - kv_pos) < self.window, bias, 0.0)
    return aft_pairwise(q, k, v, bias, info.dense_mask()).astype(q.dtype)


@MIXERS.register("aft")
def _aft(cfg, *, causal: bool, rngs: nnx.Rngs) -> AFTAttention:
  defaults = {"variant": "full", "window": 32, "max_len": cfg.max_seq_len, "rope": False}
  options = mixer_options(cfg, "aft", defaults)
  kwargs = position_free_kwargs(cfg, "aft", options, causal=causal, rngs=rngs)
  return AFTAttention(**kwargs, **options)

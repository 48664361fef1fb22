"""The shared shell of every attention variant: projections, RoPE, KV cache, masks.

A variant subclasses `Attention` and overrides `attend(q, k, v, bias_info)`; projections, rotary
embeddings, grouped-query heads and cache updates stay here, so each variant file holds only the
part of the math that differs.

Axes: activations [batch, seq, heads, head_dim]; keys/values [batch, seq, kv_heads, head_dim].
Parameters: q (embed, heads, head_dim), k/v (embed, kv_heads, head_dim), o (heads, head_dim, embed).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.embeddings import apply_rope
from reslm.models.linear import Linear, ProjectOut, fused_linear
from reslm.models.sharding import constrain

ATTENTION_BIASES = ("none", "qkv", "all")
NEG_INF = -1e30  # Finite, so fully masked rows give a uniform (not NaN) softmax before masking out.


@dataclasses.dataclass(frozen=True)
class MaskInfo:
  """What decides which key a query may see.

  Attributes:
    q_pos: Query positions in the key index space, int32 [batch, q_len].
    kv_pos: Key positions, int32 [batch, kv_len].
    kv_valid: Whether each key slot holds a real token, bool [batch, kv_len].
    q_seg: Query segment ids (0 = padding) or None, [batch, q_len].
    kv_seg: Key segment ids or None, [batch, kv_len].
    causal: Whether a query at position i may only see keys at positions <= i.
  """

  q_pos: jax.Array
  kv_pos: jax.Array
  kv_valid: jax.Array
  q_seg: jax.Array | None
  kv_seg: jax.Array | None
  causal: bool

  def dense_mask(self) -> jax.Array:
    """The boolean mask, [batch, q_len, kv_len]."""
    mask = self.kv_valid[:, None, :]
    if self.causal:
      mask = mask & (self.kv_pos[:, None, :] <= self.q_pos[:, :, None])
    if self.q_seg is not None:
      mask = mask & (self.q_seg[:, :, None] == self.kv_seg[:, None, :])
    return mask


class Attention(nnx.Module):
  """Multi-head attention with grouped-query heads, RoPE and an optional KV cache.

  Args:
    d_model: Model width.
    num_heads: Query heads.
    num_kv_heads: Key/value heads; must divide num_heads (1 = multi-query attention).
    head_dim: Width of each head.
    causal: Decoder (causal) or encoder (bidirectional) attention.
    rope_theta: RoPE base, or None for no rotary embedding.
    rope_scaling: Optional RoPE frequency scaling (`models.embeddings.RopeScaling`).
    bias: Projection biases: "none", "qkv" (q, k and v: Qwen2) or "all" (q, k, v and o: GPT-2,
      BERT).
    init_std: Initialiser std of the input projections.
    out_init_std: Initialiser std of the output projection.
    dtype: Compute dtype.
    param_dtype: Storage dtype.
    rngs: Random streams.
  """

  # "int8": `init_cache` stores keys/values as int8 with one float32 scale per token and kv head
  # (set on a model by compress's kv_int8 method); None: the compute dtype.
  kv_cache_quant: str | None = None
  # Why cached decoding (prefill, then one token per call) differs from the full forward, or None
  # when it equals it; every mixer and MLP declares it, `models.decoding` collects it for
  # `generate`. A variant whose cached path approximates differently overrides it.
  decode_inexact: str | None = None
  # Whether `attend` against a cache is exact softmax attention under `decode_mask(info)`; then an
  # int8 KV cache is attended straight from its codes (`int8_attention`, no float copy of the
  # cache). Otherwise (a variant that estimates attention) the int8 cache is dequantised whole and
  # handed to `attend`.
  softmax_decode: bool = False

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    causal: bool = True,
    rope_theta: float | None = 10_000.0,
    rope_scaling=None,
    bias: str = "none",
    init_std: float = 0.02,
    out_init_std: float = 0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    if bias not in ATTENTION_BIASES:
      raise ValueError(f"bias={bias!r} is not known; choose one of: {', '.join(ATTENTION_BIASES)}")
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.causal = causal
    self.rope_theta = rope_theta
    self.rope_scaling = rope_scaling
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    in_bias = bias != "none"
    self.q = Linear(
      d_model,
      (num_heads, head_dim),
      axes=("embed", "heads", "head_dim"),
      use_bias=in_bias,
      init_std=init_std,
      **kw,
    )
    self.k = Linear(
      d_model,
      (num_kv_heads, head_dim),
      axes=("embed", "kv_heads", "head_dim"),
      use_bias=in_bias,
      init_std=init_std,
      **kw,
    )
    self.v = Linear(
      d_model,
      (num_kv_heads, head_dim),
      axes=("embed", "kv_heads", "head_dim"),
      use_bias=in_bias,
      init_std=init_std,
      **kw,
    )
    self.o = ProjectOut(
      (num_heads, head_dim),
      d_model,
      axes=("heads", "head_dim", "embed"),
      use_bias=bias == "all",
      init_std=out_init_std,
      **kw,
    )

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """An empty KV cache, {"k", "v"}: [batch, max_len, kv_heads, head_dim]."""
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    if self.kv_cache_quant == "int8":  # Plus "k_scale"/"v_scale": [batch, max_len, kv_heads].
      codes, scales = jnp.zeros(shape, jnp.int8), jnp.ones(shape[:3], jnp.float32)
      return {"k": codes, "v": codes, "k_scale": scales, "v_scale": scales}
    dtype = dtype or self.dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def __call__(
    self,
    x_btd: jax.Array,
    *,
    positions_bt: jax.Array,
    segment_ids_bt: jax.Array | None = None,
    cache: dict[str, jax.Array] | None = None,
    cache_index: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Attends over the input (and the cache, when given).

    Args:
      x_btd: Input, [batch, seq, d_model].
      positions_bt: Token positions for RoPE, [batch, seq].
      segment_ids_bt: Optional segment ids (0 = padding) for packed or padded inputs; no cache.
      cache: Optional KV cache from `init_cache`; the new keys/values are written at cache_index.
      cache_index: Scalar int, the cache slot of the first input token.

    Returns:
      The output [batch, seq, d_model] and the updated cache (None without a cache).
    """
    q, k, v = self.project(x_btd, positions_bt)
    out, new_cache = self.mix(
      q, k, v, segment_ids_bt=segment_ids_bt, cache=cache, cache_index=cache_index
    )  # [b, t, heads, head_dim]
    out = constrain(out.astype(self.dtype), ("batch", "seq", "heads", "head_dim"))
    return self.o(out), new_cache

  def project(self, x_btd: jax.Array, positions_bt: jax.Array):
    """Queries [b, t, heads, d] and keys/values [b, t, kv_heads, d], RoPE applied."""
    q, k, v = fused_linear(x_btd, (self.q, self.k, self.v))
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))
    k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    if self.rope_theta is not None:
      q = apply_rope(q, positions_bt, self.rope_theta, self.rope_scaling)
      k = apply_rope(k, positions_bt, self.rope_theta, self.rope_scaling)
    return q, k, v

  def mix(self, q, k, v, *, segment_ids_bt=None, cache=None, cache_index=None):
    """Softmax-family mixing: writes k/v into the KV cache (if any), builds the mask, attends.

    Variants whose decoding state is not a KV cache (linear attention, EMA) override this and
    `init_cache`; softmax variants only override `attend`.

    Returns:
      (output [b, t, heads, head_dim], updated cache or None).
    """
    b, t = q.shape[:2]
    if cache is None:
      pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      info = MaskInfo(pos, pos, jnp.ones((b, t), bool), segment_ids_bt, segment_ids_bt, self.causal)
      return self.attend(q, k, v, info), None
    if segment_ids_bt is not None:
      raise ValueError("segment_ids are not supported together with a KV cache")
    index = jnp.asarray(cache_index, jnp.int32)
    s = cache["k"].shape[1]
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_pos = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
    info = MaskInfo(q_pos, kv_pos, kv_pos < index + t, None, None, self.causal)
    if "k_scale" in cache:  # int8 cache: quantise the call's keys/values, write them.
      (k_codes, k_scale), (v_codes, v_scale) = quantize_kv(k), quantize_kv(v)
      out = None
      if self.softmax_decode:
        # Attend over the codes: the cache as it was (slots before index) and the call's own
        # quantised tokens, the keys the written cache will hold. Reading the cache before the
        # write (ordered by the barrier) lets XLA update it in place; a read of the written cache
        # or an unordered one makes XLA copy the whole cache (measured: 2.3x the step's bytes).
        before = MaskInfo(q_pos, kv_pos, kv_pos < index, None, None, self.causal)
        itself = MaskInfo(q_pos, q_pos, jnp.ones((b, t), bool), None, None, self.causal)
        segments = [
          (*(cache[n] for n in ("k", "k_scale", "v", "v_scale")), self.decode_mask(before)),
          (k_codes, k_scale, v_codes, v_scale, self.decode_mask(itself)),
        ]
        out = int8_attention(q, segments)
        cache, out = jax.lax.optimization_barrier((cache, out))
      new_cache = {}
      for name, codes, scales in (("k", k_codes, k_scale), ("v", v_codes, v_scale)):
        new_cache[name] = jax.lax.dynamic_update_slice(cache[name], codes, (0, index, 0, 0))
        new_cache[f"{name}_scale"] = jax.lax.dynamic_update_slice(
          cache[f"{name}_scale"], scales, (0, index, 0)
        )
      if out is not None:
        return out, new_cache
      # A variant that estimates attention gets the dequantised cache (a float copy of it).
      k_all, v_all = (new_cache[n] * new_cache[f"{n}_scale"][..., None] for n in ("k", "v"))
    else:
      k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
      v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
      new_cache = {"k": k_all, "v": v_all}
    out = self.attend(q, k_all.astype(self.dtype), v_all.astype(self.dtype), info)
    return out, new_cache

  def decode_mask(self, info: MaskInfo) -> jax.Array:
    """The keys `attend` lets each query see against a cache, bool [b, q_len, kv_len]."""
    return info.dense_mask()

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo) -> jax.Array:
    """The attention core; variants override this. Shapes as in `reference_attention`."""
    raise NotImplementedError


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Keys or values [b, t, kv_heads, d] -> int8 codes and float32 scales max|x| / 127, [b, t, g]."""
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
  scales = jnp.where(amax > 0, amax / 127.0, 1.0)
  return jnp.clip(jnp.round(x / scales[..., None]), -127, 127).astype(jnp.int8), scales


FUSED_QUERIES = 16  # Calls with up to this many queries (decoding) read the int8 codes directly.
INT8_KEY_BLOCK = 512  # Longer calls (a prefill) dequantise this many keys at a time.


def int8_attention(q: jax.Array, segments, *, key_block: int = INT8_KEY_BLOCK) -> jax.Array:
  """`reference_attention` over int8 keys/values, dequantised inside the attention.

  k_j = k_codes_j · k_scale_j per (token, kv head), so q·k_j = (q·k_codes_j) · k_scale_j: scores
  come from the codes and the key scales scale the [.., kv_len] scores; Σ_j p_j v_j =
  Σ_j (p_j · v_scale_j) v_codes_j: the value scales fold into the softmax weights. The keys may
  come in several segments (e.g. the cache before this call and the call's own tokens), attended
  jointly: one softmax over all of them. No float copy of a segment is made:
    - up to FUSED_QUERIES queries (decoding steps): both contractions are multiply-reduces over the
      codes in their stored [b, s, kv_heads, d] layout, which XLA fuses with the int8 -> float
      conversion, so a step reads the cache once, as int8 (experiments/benchmarks/decode.py
      measures the bytes against dequantising the cache whole);
    - more queries (a prefill, compute-bound): an online softmax over blocks of `key_block` keys
      that converts one block at a time to float and contracts it with matmuls.
  Softmax statistics are float32 throughout (the reference's scores are float32 too).

  Args:
    q: Queries, [b, t, heads, d].
    segments: (k_codes, k_scale, v_codes, v_scale, mask) tuples: int8 codes [b, s, kv_heads, d],
      float32 scales [b, s, kv_heads] and which keys each query sees, bool [b, t, s].
    key_block: Keys per block of the prefill schedule.

  Returns:
    [b, t, heads, d] in q's dtype; rows that see no key at all are zeros.
  """
  b, t, h, d = q.shape
  g = segments[0][0].shape[2]
  q32 = q.astype(jnp.float32).reshape(b, t, g, h // g, d) * d**-0.5
  part = _int8_fused if t <= FUSED_QUERIES else functools.partial(_int8_blocks, key_block=key_block)
  parts = [part(q32, *segment) for segment in segments]  # (max, sum, weighted values) each
  top = functools.reduce(jnp.maximum, [m for m, _, _ in parts])  # [b, t, g, r]
  total = sum(n * jnp.exp(m - top) for m, n, _ in parts)
  out = sum(acc * jnp.exp(m - top)[..., None] for m, _, acc in parts)
  out = out / jnp.maximum(total, 1e-30)[..., None]  # Rows that see nothing: 0 / 0 -> 0.
  return out.reshape(b, t, h, d).astype(q.dtype)


def _int8_fused(q, k_codes, k_scale, v_codes, v_scale, mask):
  """One segment's softmax statistics by fused multiply-reduces over the codes.

  q: [b, t, g, r, d] (scaled). Returns max and sum [b, t, g, r] and Σ weight · value [.., d].
  """
  f32 = jnp.float32
  # [b, s, t, g, r]: keys lead, in the codes' own layout (a transposed read would copy them).
  scores = jnp.sum(q[:, None] * k_codes[:, :, None, :, None, :].astype(f32), -1)
  scores = scores * k_scale[:, :, None, :, None]
  visible = mask.transpose(0, 2, 1)[..., None, None]  # [b, s, t, 1, 1]
  top = jnp.max(jnp.where(visible, scores, NEG_INF), 1)  # [b, t, g, r]
  weights = jnp.where(visible, jnp.exp(scores - top[:, None]), 0.0)
  total = weights.sum(1)
  weights = weights * v_scale[:, :, None, :, None]
  out = jnp.sum(weights[..., None] * v_codes[:, :, None, :, None, :].astype(f32), 1)
  return top, total, out


def _int8_blocks(q, k_codes, k_scale, v_codes, v_scale, mask, *, key_block):
  """One segment's softmax statistics by an online softmax over blocks of keys.

  A scan carries the running max, sum and weighted values (flash attention's recurrence); each
  block is dequantised in the loop body, so one block exists in float. Same returns as
  `_int8_fused`.
  """
  b, t, g, r, d = q.shape
  s = k_codes.shape[1]
  c = min(key_block, s)
  pad = -s % c
  widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)  # noqa: E731
  k_codes, k_scale, v_codes, v_scale = (
    jnp.pad(x, widths(x)) for x in (k_codes, k_scale, v_codes, v_scale)
  )
  mask = jnp.pad(mask, [(0, 0), (0, 0), (0, pad)])  # Padded keys are invisible.

  def block(carry, start):
    top, total, acc = carry  # [b, t, g, r], [b, t, g, r], [b, t, g, r, d]
    cut = lambda x, axis=1: jax.lax.dynamic_slice_in_dim(x, start, c, axis)  # noqa: E731
    k = cut(k_codes).astype(jnp.float32) * cut(k_scale)[..., None]  # [b, c, g, d]
    v = cut(v_codes).astype(jnp.float32) * cut(v_scale)[..., None]
    visible = cut(mask, 2)[:, :, None, None]  # [b, t, 1, 1, c]
    scores = jnp.einsum("btgrd,bcgd->btgrc", q, k)
    new_top = jnp.maximum(top, jnp.max(jnp.where(visible, scores, NEG_INF), -1))
    p = jnp.where(visible, jnp.exp(scores - new_top[..., None]), 0.0)
    fix = jnp.exp(top - new_top)
    acc = acc * fix[..., None] + jnp.einsum("btgrc,bcgd->btgrd", p, v)
    return (new_top, total * fix + p.sum(-1), acc), None

  init = (
    jnp.full((b, t, g, r), NEG_INF, jnp.float32),
    jnp.zeros((b, t, g, r), jnp.float32),
    jnp.zeros((b, t, g, r, d), jnp.float32),
  )
  return jax.lax.scan(block, init, jnp.arange(0, s + pad, c))[0]


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax(q kᵀ / √d + mask) v with grouped-query heads, softmax in float32.

  Args:
    q: Queries, [batch, q_len, heads, head_dim].
    k: Keys, [batch, kv_len, kv_heads, head_dim].
    v: Values, [batch, kv_len, kv_heads, head_dim].
    mask: Boolean, [batch, q_len, kv_len]; rows with no visible key output zeros.

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.
  """
  b, t, h, d = q.shape
  g = k.shape[2]
  q = q.reshape(b, t, g, h // g, d)  # [b, t, kv_heads, group, d]
  scores = jnp.einsum("btgrd,bsgd->bgrts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (d**-0.5)
  m = mask[:, None, None, :, :]
  scores = jnp.where(m, scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bgrts,bsgd->btgrd", probs.astype(v.dtype), v)
  # A row with no visible key (padding) would average every value: zero it instead. Scaling the
  # [batch, q_len] output rows is far cheaper than masking the probabilities again.
  seen = mask.any(axis=-1).astype(out.dtype)[:, :, None, None, None]
  return (out * seen).reshape(b, t, h, d)


def attention_kwargs(cfg, *, causal: bool, rngs) -> dict:
  """The `Attention` constructor arguments every variant derives from the model config."""
  return dict(
    d_model=cfg.d_model,
    num_heads=cfg.num_heads,
    num_kv_heads=cfg.num_kv_heads,
    head_dim=cfg.resolved_head_dim,
    causal=causal,
    rope_theta=cfg.rope_theta if cfg.position == "rope" else None,
    rope_scaling=cfg.rope_scaling_spec,
    bias=cfg.attention_bias,
    init_std=cfg.init_std,
    out_init_std=cfg.out_init_std,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.storage_dtype,
    rngs=rngs,
  )

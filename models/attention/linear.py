"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Algorithm: softmax(q·k) is replaced by the kernel φ(q)·φ(k) with φ(x) = elu(x) + 1 > 0, so
attention factorises as out_i = φ(q_i) S / (φ(q_i) · z) with S = Σ_j φ(k_j) v_jᵀ and
z = Σ_j φ(k_j), sums over the keys query i may see.

* Bidirectional: S and z are sums over the whole sequence, O(T d²).
* Causal: chunked prefix sums. Inside a chunk of c tokens an explicit lower-triangular [c, c]
  product handles the intra-chunk terms; across chunks `lax.scan` carries (S, z), so the cost is
  O(T c d + T d²) and no [T, T] matrix is ever formed.
* Decoding: (S [b, kv_heads, d, d], z [b, kv_heads, d]) is a constant-size recurrent state; a
  cached call runs the same chunked scan starting from it and returns the updated state.

Grouped-query heads share their kv head's (S, z). Segment ids act as a padding mask only (padded
keys contribute nothing, padded queries output zeros); packed sequences are not separated.
Everything is computed in float32.

Positions: none by default, as in the paper: φ is applied to the un-rotated projections, so order
reaches the layer only through causality. The option `rope=True` applies RoPE to q and k before
φ (not in the paper; φ(R q)·φ(R k) is no longer a function of the relative position).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.attention.base import Attention, attention_kwargs
from reslm.models.chunks import from_chunks, to_chunks
from reslm.models.registry import MIXERS, check_option, mixer_options


def check_chunk_size(variant: str, value) -> int:
  """Returns `value` if it is a positive int, else raises a one-line ValueError."""
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(
      f"chunk_size={value!r} is not allowed for {variant!r} attention; "
      "it must be a positive integer"
    )
  return value


def position_free_kwargs(cfg, variant: str, options: dict, *, causal: bool, rngs) -> dict:
  """`attention_kwargs` for a kernelised variant: RoPE only if `options["rope"]` (popped) is True.

  Linear, efficient and AFT attention apply their feature maps to un-rotated q and k in their
  papers; `rope=True` keeps the shell's RoPE (q and k rotated before the feature maps).
  """
  rope = options.pop("rope")
  check_option(variant, "rope", rope, isinstance(rope, bool), "True or False")
  kwargs = attention_kwargs(cfg, causal=causal, rngs=rngs)
  if not rope:
    kwargs["rope_theta"] = None
  return kwargs


def split_groups(q: jax.Array, num_kv_heads: int) -> jax.Array:
  """[b, t, h, d] -> [b, t, kv_heads, h // kv_heads, d]: query head i uses kv head i // group."""
  b, t, h, d = q.shape
  return q.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def feature_map(x: jax.Array) -> jax.Array:
  """φ(x) = elu(x) + 1, positive so the normaliser never vanishes."""
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  # den is 0 only where no key is visible (padding); the output is 0 there.
  return num / jnp.where(den > 0, den, 1.0)[..., None]


def bidirectional_linear_attention(q, k, v, valid=None) -> jax.Array:
  """φ(Q)(φ(K)ᵀV) / (φ(Q)·Σφ(K)).

  Args:
    q: [b, t, h, d]; k, v: [b, t, kv_heads, d].
    valid: Optional bool [b, t], False at padding.

  Returns:
    [b, t, h, d] float32.
  """
  b, t, h, _ = q.shape
  fq = split_groups(feature_map(q), k.shape[2])  # [b, t, g, r, d]
  fk, v = feature_map(k), v.astype(jnp.float32)
  if valid is not None:
    fk = fk * valid[:, :, None, None]
    v = v * valid[:, :, None, None]
  s = jnp.einsum("btgd,btge->bgde", fk, v)  # [b, g, d, e]
  z = fk.sum(axis=1)  # [b, g, d]
  out = _safe_div(jnp.einsum("btgrd,bgde->btgre", fq, s), jnp.einsum("btgrd,bgd->btgr", fq, z))
  if valid is not None:
    out = out * valid[:, :, None, None, None]
  return out.reshape(b, t, h, -1)


def causal_linear_attention(q, k, v, *, chunk_size, valid=None, state=None, unroll=1):
  """Causal linear attention by chunked prefix sums, optionally continuing a recurrent state.

  Args:
    q: [b, t, h, d]; k, v: [b, t, kv_heads, d].
    chunk_size: Tokens per chunk (capped at t).
    valid: Optional bool [b, t], False at padding.
    state: Optional (S [b, kv_heads, d, d], z [b, kv_heads, d]) from earlier tokens.
    unroll: Passed to `lax.scan` (True unrolls fully, e.g. for cost analysis).

  Returns:
    (output [b, t, h, d] float32, final state (S, z)).
  """
  b, t, h, d = q.shape
  g, e = k.shape[2], v.shape[-1]
  fq = split_groups(feature_map(q), g)  # [b, t, g, r, d]
  fk, v = feature_map(k), v.astype(jnp.float32)
  if valid is not None:
    fk = fk * valid[:, :, None, None]
    v = v * valid[:, :, None, None]
  if state is None:
    state = (jnp.zeros((b, g, d, e), jnp.float32), jnp.zeros((b, g, d), jnp.float32))
  c = min(chunk_size, t)
  causal = jnp.tril(jnp.ones((c, c), jnp.float32))  # [i, j]: key j visible to query i

  def chunk(carry, xs):
    s, z = carry  # [b, g, d, e], [b, g, d]
    cq, ck, cv = xs  # [b, c, g, r, d], [b, c, g, d], [b, c, g, e]
    a = jnp.einsum("bigrd,bjgd->bgrij", cq, ck) * causal  # [b, g, r, c, c]
    num = jnp.einsum("bgrij,bjge->bigre", a, cv) + jnp.einsum("bigrd,bgde->bigre", cq, s)
    den = jnp.einsum("bgrij->bigr", a) + jnp.einsum("bigrd,bgd->bigr", cq, z)
    s = s + jnp.einsum("bjgd,bjge->bgde", ck, cv)
    z = z + ck.sum(axis=1)
    return (s, z), _safe_div(num, den)

  xs = (to_chunks(fq, c), to_chunks(fk, c), to_chunks(v, c))
  state, out = jax.lax.scan(chunk, tuple(x.astype(jnp.float32) for x in state), xs, unroll=unroll)
  out = from_chunks(out, t)  # [b, t, g, r, e]
  if valid is not None:
    out = out * valid[:, :, None, None, None]
  return out.reshape(b, t, h, e), state


class LinearAttention(Attention):
  """Linear attention with φ = elu + 1; decodes with a constant-size (S, z) state.

  Args:
    chunk_size: Tokens per chunk of the causal prefix-sum form.
    **kwargs: As for `Attention`.
  """

  def __init__(self, *args, chunk_size: int = 64, **kwargs):
    self.chunk_size = check_chunk_size("linear", chunk_size)
    super().__init__(*args, **kwargs)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """A zero state {"s": [b, kv_heads, d, d], "z": [b, kv_heads, d]}; max_len is unused."""
    del max_len, dtype  # The state is float32 and its size does not grow with the sequence.
    g, d = self.num_kv_heads, self.head_dim
    return {"s": jnp.zeros((batch, g, d, d), jnp.float32), "z": jnp.zeros((batch, g, d))}

  def mix(self, q, k, v, *, segment_ids_bt=None, cache=None, cache_index=None):
    del cache_index  # The recurrent state already summarises every earlier token.
    valid = None if segment_ids_bt is None else segment_ids_bt != 0
    if cache is not None and (segment_ids_bt is not None or not self.causal):
      raise ValueError("linear attention decodes only causally and without segment_ids")
    if not self.causal:
      return bidirectional_linear_attention(q, k, v, valid).astype(q.dtype), None
    state = None if cache is None else (cache["s"], cache["z"])
    out, (s, z) = causal_linear_attention(
      q, k, v, chunk_size=self.chunk_size, valid=valid, state=state
    )
    return out.astype(q.dtype), (None if cache is None else {"s": s, "z": z})


@MIXERS.register("linear")
def _linear(cfg, *, causal: bool, rngs: nnx.Rngs) -> LinearAttention:
  options = mixer_options(cfg, "linear", {"chunk_size": 64, "rope": False})
  kwargs = position_free_kwargs(cfg, "linear", options, causal=causal, rngs=rngs)
  return LinearAttention(**kwargs, **options)

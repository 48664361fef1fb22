"""RWKV-6 ("Finch") time-mix with data-dependent decay, and the RWKV channel-mix MLP (Peng et al.
2024, "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence").

Time-mix, for an input x [b, t, D] with H heads of size K (D = H·K):
  1. Token shift with data-dependent lerp (ddlerp): Δx_t = x_{t-1} - x_t (x_{-1} = 0), and for each
     of w, k, v, r, g:  x^◇_t = x_t + Δx_t ⊙ (μ_◇ + LoRA_◇(x_t + Δx_t ⊙ μ_x)),
     LoRA_◇(y) = tanh(y A) B_◇ with a shared rank-`mix_lora` A.
  2. r, k, v, g = x^r W_r, x^k W_k, x^v W_v, x^g W_g  (per head [K]).
  3. Data-dependent per-channel decay d_t = d + tanh(x^w A_d) B_d (rank `decay_lora`),
     w_t = exp(-exp(d_t)) in (0, 1).
  4. WKV per head, state S [K, K] (key channel i, value channel j) and bonus u [K]:
        o_t = r_t (S_{t-1} + diag(u) k_tᵀ v_t),    S_t = diag(w_t) S_{t-1} + k_tᵀ v_t.
  5. out = (GroupNorm_H(o) ⊙ silu(g)) W_o.

Training form, in chunks of c tokens with state S_0 at the chunk start. With the in-chunk log
decay between tokens G(s, t) = Σ_{s<τ<t} log w_τ <= 0 (so every exponential is <= 1):
  o_t = (r_t ⊙ e^{G(-1, t)}) S_0 + Σ_{s<t} Σ_i r_ti k_si e^{G(s, t)_i} v_s + (r_t ⊙ u ⊙ k_t) v_t
  S_c = e^{G(-1, c)} ⊙ S_0 + Σ_s (k_s ⊙ e^{G(s, c)})ᵀ v_s.
The pairwise [c, c, K] exponents G(s, t) are formed explicitly, each as a masked cumulative sum
started at s (Mamba-2's "segsum"), not as a difference of prefix sums L_{t-1} - L_s: with strong
decays the prefix sums grow large and their difference loses float32 precision (~70x the
recurrence's rounding error with chunks of 32 in a strong-decay test; the segsum form matches the
recurrence). A `lax.scan` carries S across chunks and the chunk body is rematerialised in the
backward pass, so the working set is one chunk's [c, c, K] per head and the compute O(T c K) per
head. log w is clamped at -20 (w >= 2e-9, which already erases the state in float32) to keep it
finite. The WKV runs in float32.

Decoding (RNN form): the state is {"shift": [b, D] (the last token's input, for the token shift),
"wkv": [b, H, K, K]}; a cached call with t >= 1 tokens runs the same chunked form from it.

Segment ids act as a padding mask: padded tokens (id 0) enter the shift as zeros, add nothing to
the state (k = 0) and do not decay it (w = 1), and output zeros, so left padding is invisible;
packed sequences are not separated. The time-mix is causal only (the builder raises otherwise).

Channel-mix ("rwkv_cmix" MLP): k = relu(x^k W_k)², out = sigmoid(x^r W_r) ⊙ (k W_v) with a token
shift lerp. Its shift needs the previous token's input, so it keeps a decoding state of its own,
{"shift": [b, D]} (the block passes MLPs that define `init_cache` their cache): with it a call
continues the sequence, so token-by-token decoding equals the full forward; without it the shift
starts from zero at the call's first token (training, scoring).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reslm.models.chunks import from_chunks, to_chunks
from reslm.models.linear import Linear, ProjectOut
from reslm.models.registry import MIXERS, MLPS, check_int, layer_kwargs, mixer_options
from reslm.models.sharding import param

DEFAULTS = {"chunk_size": 32, "mix_lora": 32, "decay_lora": 64}
LOG_DECAY_MIN = -20.0  # log w floor (keeps it finite): w = 2e-9 already erases the state.
GROUP_NORM_EPS = 64e-5  # RWKV-6's ln_x eps (1e-5 · head_size_divisor²).
# RWKV-6 initialises by layer depth; the stacked (vmapped) layers here share one init, that of a
# middle layer (layer_id / n_layer = 0.5).
RATIO_0_TO_1, RATIO_1_TO_ALMOST0 = 0.5, 0.5


def token_shift(x_btd: jax.Array, prev_bd: jax.Array | None = None) -> jax.Array:
  """x_{t-1} for every t: the sequence shifted right by one, `prev` (or zeros) first."""
  first = jnp.zeros_like(x_btd[:, :1]) if prev_bd is None else prev_bd[:, None].astype(x_btd.dtype)
  return jnp.concatenate([first, x_btd[:, :-1]], axis=1)


def chunked_wkv(r, k, v, log_w, u, *, chunk_size: int, state=None, unroll=1):
  """The RWKV-6 WKV over a sequence, chunked, optionally continuing a state.

  Args:
    r, k, v: Receptance, key, value, [b, t, H, K].
    log_w: log decays <= 0, [b, t, H, K]; clamped at LOG_DECAY_MIN.
    u: Bonus, [H, K].
    chunk_size: Tokens per chunk (capped at t).
    state: Optional S [b, H, K, K] (key channel, value channel); zeros if None.
    unroll: Passed to the `lax.scan` over chunks.

  Returns:
    (o [b, t, H, K] float32, final state [b, H, K, K] float32).
  """
  b, t, h, kd = r.shape
  r, k, v, log_w, u = (x.astype(jnp.float32) for x in (r, k, v, log_w, u))
  log_w = jnp.maximum(log_w, LOG_DECAY_MIN)
  if state is None:
    state = jnp.zeros((b, h, kd, v.shape[-1]), jnp.float32)
  c = min(chunk_size, t)
  earlier = jnp.tril(jnp.ones((c, c), bool), -1)[None, :, :, None, None]  # [1, t, s, 1, 1]: s < t
  gap = jnp.tril(jnp.ones((c, c), bool), -2)[None, :, :, None, None]  # s < t - 1

  @jax.checkpoint  # Recompute a chunk's [b, c, c, H, K] decays in the backward pass.
  def chunk(s0, xs):
    cr, ck, cv, cw = xs  # [b, c, H, K]
    # Every decay exponent is a sum of log w over the tokens in between, accumulated from zero
    # (never a difference of two long prefix sums, which would lose float32 precision).
    prev = jnp.pad(cw[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))  # log w_{t-1}
    after = jax.lax.cumsum(jnp.pad(cw[:, 1:], ((0, 0), (0, 1), (0, 0), (0, 0))), 1, reverse=True)
    before = jnp.cumsum(prev, axis=1)  # L_{t-1} = Σ_{τ<t} log w_τ
    out = jnp.einsum("bthi,bhij->bthj", cr * jnp.exp(before), s0)  # From the carried state.
    # [b, t, s, H, K]: Σ_{s<τ<t} log w_τ = L_{t-1} - L_s <= 0, as a cumsum down t.
    between = jnp.cumsum(jnp.where(gap, prev[:, :, None], 0.0), axis=1)
    scores = jnp.einsum("bthi,bshi,btshi->bhts", cr, ck, jnp.where(earlier, jnp.exp(between), 0.0))
    out = out + jnp.einsum("bhts,bshj->bthj", scores, cv)
    out = out + jnp.sum(cr * u * ck, -1, keepdims=True) * cv  # The bonus for the current token.
    total = jnp.sum(cw, axis=1)  # [b, H, K]
    s1 = jnp.exp(total)[..., None] * s0 + jnp.einsum("bshi,bshj->bhij", ck * jnp.exp(after), cv)
    return s1, out

  # Zero padding of the last chunk has k = 0 and log w = 0: the final state is exact.
  xs = tuple(to_chunks(x, c) for x in (r, k, v, log_w))
  state, out = jax.lax.scan(chunk, state.astype(jnp.float32), xs, unroll=unroll)
  return from_chunks(out, t), state


class RWKV6TimeMix(nnx.Module):
  """RWKV-6 time-mix (causal); decodes with a constant-size (shift, WKV) state.

  Args:
    d_model: Model width D; must equal num_heads * head_dim.
    num_heads: Heads H.
    head_dim: Head size K.
    chunk_size: Tokens per chunk of the training form.
    mix_lora: Rank of the ddlerp LoRA.
    decay_lora: Rank of the decay LoRA.
    init_std: Initialiser std of W_r, W_k, W_v, W_g.
    out_init_std: Initialiser std of W_o.
    dtype: Compute dtype.
    param_dtype: Storage dtype.
    rngs: Random streams.
  """

  decode_inexact = None  # The (shift, WKV) state is cached: decoding equals the full forward.

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    head_dim: int,
    *,
    chunk_size: int = 32,
    mix_lora: int = 32,
    decay_lora: int = 64,
    init_std: float = 0.02,
    out_init_std: float = 0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    for name, value in (
      ("chunk_size", chunk_size),
      ("mix_lora", mix_lora),
      ("decay_lora", decay_lora),
    ):
      check_int("rwkv", name, value, 1)
    if num_heads * head_dim != d_model:
      raise ValueError(
        f"rwkv needs d_model == num_heads * head_dim; got d_model={d_model}, "
        f"num_heads={num_heads}, head_dim={head_dim} (leave head_dim at d_model // num_heads)"
      )
    self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
    self.chunk_size = chunk_size
    self.dtype = dtype
    # Deterministic inits in NumPy (no per-op compiles while the layer stack is being built).
    small = lambda shape: jax.random.uniform(rngs.params(), shape, param_dtype, -0.01, 0.01)
    const = lambda a: jnp.asarray(a, param_dtype)
    frac = np.arange(d_model) / d_model  # RWKV's ddd
    lerp = lambda p: 1.0 - frac**p
    # Order of the five lerps: w, k, v, r, g.
    maa = np.stack(
      [
        lerp(RATIO_1_TO_ALMOST0),
        lerp(RATIO_1_TO_ALMOST0),
        lerp(RATIO_1_TO_ALMOST0) - 0.3 * RATIO_0_TO_1,
        lerp(0.5 * RATIO_1_TO_ALMOST0),
        lerp(0.5 * RATIO_1_TO_ALMOST0),
      ]
    )
    self.maa_x = param(const(lerp(RATIO_1_TO_ALMOST0)), ("embed",))
    self.maa = param(const(maa), (None, "embed"))  # [5, D]
    self.maa_a = param(const(np.zeros((d_model, 5, mix_lora))), ("embed", None, None))
    self.maa_b = param(small((5, mix_lora, d_model)), (None, None, "embed"))
    n = np.arange(d_model) / max(d_model - 1, 1)
    decay = -6.0 + 5.0 * n ** (0.7 + 1.3 * RATIO_0_TO_1)
    self.decay = param(const(decay.reshape(num_heads, head_dim)), ("heads", "head_dim"))
    self.decay_a = param(const(np.zeros((d_model, decay_lora))), ("embed", None))
    self.decay_b = param(small((decay_lora, num_heads, head_dim)), (None, "heads", "head_dim"))
    bonus = RATIO_0_TO_1 * (1.0 - n) + ((np.arange(d_model) + 1) % 3 - 1) * 0.1
    self.bonus = param(const(bonus.reshape(num_heads, head_dim)), ("heads", "head_dim"))
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    axes = ("embed", "heads", "head_dim")
    self.r = Linear(d_model, (num_heads, head_dim), axes=axes, init_std=init_std, **kw)
    self.k = Linear(d_model, (num_heads, head_dim), axes=axes, init_std=init_std, **kw)
    self.v = Linear(d_model, (num_heads, head_dim), axes=axes, init_std=init_std, **kw)
    self.g = Linear(d_model, (num_heads, head_dim), axes=axes, init_std=init_std, **kw)
    self.o = ProjectOut(
      (num_heads, head_dim),
      d_model,
      axes=("heads", "head_dim", "embed"),
      init_std=out_init_std,
      **kw,
    )
    self.ln_scale = param(const(np.ones((num_heads, head_dim))), ("heads", "head_dim"))
    self.ln_bias = param(const(np.zeros((num_heads, head_dim))), ("heads", "head_dim"))

  def init_cache(self, batch: int, max_len: int = 0, dtype=None) -> dict[str, jax.Array]:
    """A zero state {"shift": [b, D], "wkv": [b, H, K, K]} (float32); max_len is unused."""
    del max_len, dtype  # The state does not grow with the sequence.
    h, kd = self.num_heads, self.head_dim
    return {
      "shift": jnp.zeros((batch, self.d_model), jnp.float32),
      "wkv": jnp.zeros((batch, h, kd, kd), jnp.float32),
    }

  def inputs(self, x_btd: jax.Array, prev_bd: jax.Array | None = None):
    """ddlerp, projections and decays: r, k, v, g [b, t, H, K] and log w [b, t, H, K] float32."""
    x = x_btd.astype(self.dtype)
    p = lambda v: v[...].astype(self.dtype)
    dx = token_shift(x, prev_bd) - x  # [b, t, D]
    lora = jnp.tanh(jnp.einsum("btd,dfr->btfr", x + dx * p(self.maa_x), p(self.maa_a)))
    mix = jnp.einsum("btfr,frd->btfd", lora, p(self.maa_b)) + p(self.maa)  # [b, t, 5, D]
    xw, xk, xv, xr, xg = jnp.unstack(x[:, :, None] + dx[:, :, None] * mix, axis=2)
    r, k, v, g = self.r(xr), self.k(xk), self.v(xv), self.g(xg)  # Each has its own input.
    d = self.decay[...].astype(jnp.float32) + jnp.einsum(
      "btr,rhk->bthk",
      jnp.tanh(xw @ p(self.decay_a)).astype(jnp.float32),
      self.decay_b[...].astype(jnp.float32),
    )
    # log w = -exp(d); d is capped where the clamp in `chunked_wkv` applies anyway, so the
    # gradient is 0 there rather than 0 * inf.
    log_w = -jnp.exp(jnp.minimum(d, math.log(-LOG_DECAY_MIN)))
    return r, k, v, g, log_w

  def __call__(self, x_btd, *, positions_bt, segment_ids_bt=None, cache=None, cache_index=None):
    """Applies the time-mix; arguments and returns as in `Attention.__call__`.

    With `cache`, the input continues the sequence the state summarises (cache_index is unused).
    """
    del positions_bt, cache_index  # Order is carried by the shift and the recurrence.
    valid = None if segment_ids_bt is None else (segment_ids_bt != 0)[..., None]
    x = x_btd.astype(self.dtype)
    if valid is not None:
      x = x * valid.astype(x.dtype)
    state = cache if cache is not None else self.init_cache(x.shape[0])
    r, k, v, g, log_w = self.inputs(x, state["shift"])
    if valid is not None:
      k = k * valid[..., None].astype(k.dtype)
      log_w = jnp.where(valid[..., None], log_w, 0.0)
    o, wkv = chunked_wkv(
      r, k, v, log_w, self.bonus[...], chunk_size=self.chunk_size, state=state["wkv"]
    )
    mean = jnp.mean(o, -1, keepdims=True)
    var = jnp.mean(jnp.square(o - mean), -1, keepdims=True)
    o = (o - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)  # GroupNorm, one group per head
    o = o * self.ln_scale[...].astype(jnp.float32) + self.ln_bias[...].astype(jnp.float32)
    out = self.o(o.astype(self.dtype) * jax.nn.silu(g))
    if valid is not None:
      out = out * valid.astype(out.dtype)
    if cache is None:
      return out, None
    return out, {"shift": x[:, -1].astype(jnp.float32), "wkv": wkv}


class RWKVChannelMix(nnx.Module):
  """RWKV channel-mix: sigmoid(x^r W_r) ⊙ (relu(x^k W_k)² W_v), with a token shift lerp.

  Inputs are [b, t, D]. Called with a cache (decoding) the shift continues from the cache's last
  token, so cached decoding equals the full forward.

  Args:
    dim: Model width D.
    hidden: Hidden width.
    init_std: Initialiser std of W_k and W_r.
    out_init_std: Initialiser std of W_v.
    dtype, param_dtype: Compute and storage dtypes.
    rngs: Random streams.
  """

  decode_inexact = None  # The shift state is cached: decoding equals the full forward.

  def __init__(
    self,
    dim,
    hidden,
    *,
    init_std=0.02,
    out_init_std=0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    lerp = 1.0 - (np.arange(dim) / dim) ** RATIO_1_TO_ALMOST0
    self.maa = param(jnp.asarray(np.stack([lerp, lerp]), param_dtype), (None, "embed"))  # k, r
    self.key = Linear(dim, hidden, axes=("embed", "mlp"), init_std=init_std, **kw)
    self.receptance = Linear(dim, dim, axes=("embed", "embed"), init_std=init_std, **kw)
    self.value = Linear(hidden, dim, axes=("mlp", "embed"), init_std=out_init_std, **kw)
    self.dim = dim
    self.dtype = dtype

  def init_cache(self, batch: int, max_len: int = 0) -> dict[str, jax.Array]:
    """A zero shift state {"shift": [b, D]} (float32); max_len is unused."""
    del max_len
    return {"shift": jnp.zeros((batch, self.dim), jnp.float32)}

  def __call__(self, x_btd: jax.Array, *, cache: dict[str, jax.Array] | None = None):
    """[b, t, D] -> [b, t, D]; with `cache`, returns (output, updated cache)."""
    x = x_btd.astype(self.dtype)
    dx = token_shift(x, None if cache is None else cache["shift"]) - x
    maa = self.maa[...].astype(self.dtype)
    k = jnp.square(jax.nn.relu(self.key(x + dx * maa[0])))
    out = jax.nn.sigmoid(self.receptance(x + dx * maa[1])) * self.value(k)
    if cache is None:
      return out
    return out, {"shift": x[:, -1].astype(jnp.float32)}


@MIXERS.register("rwkv")
def _rwkv(cfg, *, causal: bool, rngs: nnx.Rngs) -> RWKV6TimeMix:
  if not causal:
    raise ValueError(
      "model.mixer='rwkv' is causal only; an encoder (model.kind='encoder') needs a "
      "bidirectional mixer"
    )
  options = mixer_options(cfg, "rwkv", DEFAULTS)
  return RWKV6TimeMix(
    cfg.d_model,
    cfg.num_heads,
    cfg.resolved_head_dim,
    **options,
    **layer_kwargs(cfg, rngs),
  )


@MLPS.register("rwkv_cmix")
def _rwkv_cmix(cfg, *, rngs: nnx.Rngs) -> RWKVChannelMix:
  return RWKVChannelMix(cfg.d_model, cfg.mlp_dim, **layer_kwargs(cfg, rngs))

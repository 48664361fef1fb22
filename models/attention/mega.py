"""MEGA: moving-average equipped gated attention (Ma et al. 2022, "Mega: Moving Average Equipped
Gated Attention").

Algorithm, for an input X [b, t, D]:
  1. Multi-dimensional damped EMA, per channel c and expansion dimension j < `ndim`:
       h_t = α ⊙ (β x_t) + (1 - α ⊙ δ) ⊙ h_{t-1},   y_t = Σ_j γ_j h_t,j + ω x_t,
     with α = sigmoid(.), δ = sigmoid(.) so the decay 1 - αδ lies in (0, 1). Unrolled it is a causal
     convolution with the kernel K_l = Σ_j γ_j α_j β_j (1 - α_j δ_j)^l, computed with an FFT.
  2. X' = silu(EMA(X)); shared representation Z = silu(X' W_z); queries and keys are per-dimension
     scalings of Z: Q = κ_q ⊙ Z + μ_q, K = κ_k ⊙ Z + μ_k; values V = silu(X W_v).
  3. Single-head softmax attention O = softmax(QKᵀ/√z) V, either over the whole sequence
     (`chunk_size` 0, O(T²)) or only within chunks of `chunk_size` c (O(cTz)).
  4. Gates: reset r = silu(X' W_r), update u = sigmoid(X' W_u) (as in the paper, eq. 13-16, and
     the official fairseq code: r and Z share one SiLU projection there);
     Ĥ = silu(X' W_h + (r ⊙ O) U_h); layer output Y = u ⊙ Ĥ + (1 - u) ⊙ X.

X in step 4 is the residual stream itself: the official layer normalises its input for steps 1-3
but interpolates towards the un-normalised residual, and the layer output replaces the residual
(no second skip). In this codebase's pre-norm block (x + mixer(norm(x))) the layer therefore takes
the residual stream as `residual_btd` (the block passes it: `gates_residual = True`) and returns
the update u ⊙ (Ĥ - X), so the block's x + update is exactly Y.

Same call convention as `Attention`. RoPE is not used (the EMA carries position); MEGA's relative
position bias is left out. An encoder (causal=False) gets bidirectional attention but keeps the
forward-only EMA (MEGA's bidirectional EMA is not implemented). Segment ids are not supported: the
EMA would run across packed-sequence boundaries.

Decoding: the cache holds the EMA state h [b, D, ndim] after the tokens already seen, plus keys
[b, S, z] and values [b, S, D] for the attention; chunked decoding attends within the current chunk.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.attention.base import NEG_INF
from reslm.models.linear import Linear
from reslm.models.registry import MIXERS, check_int, layer_kwargs, mixer_options
from reslm.models.sharding import param

DEFAULTS = {"ndim": 8, "chunk_size": 0, "zdim": 0}


def ema_kernel(alpha, delta, beta, gamma, length: int) -> jax.Array:
  """The EMA convolution kernel [length, D] from the (already constrained) EMA parameters [D, n]."""
  decay = 1.0 - alpha * delta  # [D, n], in (0, 1)
  lags = jnp.arange(length, dtype=jnp.float32)[:, None, None]
  powers = jnp.exp(lags * jnp.log(decay)[None])  # [l, D, n]
  return jnp.sum(powers * (gamma * alpha * beta)[None], -1)


def causal_conv(x_btd: jax.Array, kernel_ld: jax.Array) -> jax.Array:
  """y_t = Σ_{l <= t} kernel_l ⊙ x_{t-l} per channel, by FFT (zero-padded to avoid wrap-around)."""
  t = x_btd.shape[1]
  n = 2 * t
  xf = jnp.fft.rfft(x_btd.astype(jnp.float32), n=n, axis=1)
  kf = jnp.fft.rfft(kernel_ld.astype(jnp.float32), n=n, axis=0)
  return jnp.fft.irfft(xf * kf[None], n=n, axis=1)[:, :t]


def chunk_mask(q_pos, kv_pos, chunk_size: int, causal: bool) -> jax.Array:
  """Which keys each query sees, [b, t, s]: same chunk (all when chunk_size is 0), causal."""
  mask = jnp.ones(q_pos.shape + kv_pos.shape[-1:], bool)
  if chunk_size:
    mask &= (q_pos[:, :, None] // chunk_size) == (kv_pos[:, None, :] // chunk_size)
  if causal:
    mask &= kv_pos[:, None, :] <= q_pos[:, :, None]
  return mask


class MegaAttention(nnx.Module):
  """One MEGA layer: damped EMA, then single-head gated (optionally chunked) attention.

  Called with the normalised input and the residual stream X (`residual_btd`), it returns the
  residual update u ⊙ (Ĥ - X); X + update is MEGA's output u ⊙ Ĥ + (1 - u) ⊙ X.

  Args:
    d_model: Model width D.
    ndim: EMA expansion dimension per channel.
    zdim: Width of the shared query/key representation Z.
    chunk_size: Attention chunk length; 0 = full attention.
    causal: Causal attention (the EMA is always causal).
    init_std: Initialiser std of the input projections.
    out_init_std: Initialiser std of U_h and W_h, which write into the residual stream.
    dtype: Compute dtype.
    param_dtype: Storage dtype.
    rngs: Random streams.
  """

  def __init__(
    self,
    d_model: int,
    *,
    ndim: int = 8,
    zdim: int = 64,
    chunk_size: int = 0,
    causal: bool = True,
    init_std: float = 0.02,
    out_init_std: float = 0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    for name, value, low in (("ndim", ndim, 1), ("zdim", zdim, 1), ("chunk_size", chunk_size, 0)):
      check_int("mega", name, value, low)
    self.d_model, self.ndim, self.zdim = d_model, ndim, zdim
    self.chunk_size = chunk_size
    self.causal = causal
    self.dtype = dtype
    normal = lambda std, shape: std * jax.random.normal(rngs.params(), shape, param_dtype)  # noqa: E731
    ema_axes = ("embed", None)
    # α, δ start near 0.5 (sigmoid of small logits); β alternates sign as in MEGA's init.
    self.alpha_logit = param(normal(0.2, (d_model, ndim)), ema_axes)
    self.delta_logit = param(normal(0.2, (d_model, ndim)), ema_axes)
    sign = jnp.where(jnp.arange(ndim) % 2 == 0, 1.0, -1.0).astype(param_dtype)
    self.beta = param(sign + normal(0.02, (d_model, ndim)), ema_axes)
    self.gamma = param(normal(1.0, (d_model, ndim)) / ndim**0.5, ema_axes)
    self.omega = param(normal(1.0, (d_model,)), ("embed",))
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.v = Linear(d_model, d_model, axes=("embed", "mlp"), init_std=init_std, **kw)
    self.z = Linear(d_model, zdim, axes=("embed", "head_dim"), init_std=init_std, **kw)
    self.reset = Linear(d_model, d_model, axes=("embed", "mlp"), init_std=init_std, **kw)
    self.update = Linear(d_model, d_model, axes=("embed", "mlp"), init_std=init_std, **kw)
    self.hx = Linear(d_model, d_model, axes=("embed", "mlp"), init_std=out_init_std, **kw)
    self.h = Linear(d_model, d_model, axes=("mlp", "embed"), init_std=out_init_std, **kw)
    self.kappa = param(1.0 + normal(0.02, (2, zdim)), (None, "head_dim"))
    self.mu = param(jnp.zeros((2, zdim), param_dtype), (None, "head_dim"))

  def ema_params(self):
    """(α, δ, β, γ) as float32 [D, n] with 0 < α, δ < 1."""
    f = lambda p: p[...].astype(jnp.float32)  # noqa: E731
    return (
      jax.nn.sigmoid(f(self.alpha_logit)),
      jax.nn.sigmoid(f(self.delta_logit)),
      f(self.beta),
      f(self.gamma),
    )

  def ema(self, x_btd: jax.Array) -> jax.Array:
    """The damped EMA from a zero state, [b, t, D] float32 (without the ω x skip)."""
    return causal_conv(x_btd, ema_kernel(*self.ema_params(), x_btd.shape[1]))

  def ema_steps(self, x_btd: jax.Array, state_bdn: jax.Array):
    """The EMA by its recurrence from `state_bdn`: (outputs [b, t, D], final state [b, D, n])."""
    alpha, delta, beta, gamma = self.ema_params()

    def step(h, x_bd):
      h = alpha * beta * x_bd[:, :, None] + (1.0 - alpha * delta) * h
      return h, jnp.sum(gamma * h, -1)

    state, ys = jax.lax.scan(
      step, state_bdn.astype(jnp.float32), x_btd.astype(jnp.float32).swapaxes(0, 1)
    )
    return ys.swapaxes(0, 1), state

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """EMA state [b, D, ndim] (float32), keys [b, max_len, zdim] and values [b, max_len, D]."""
    dtype = dtype or self.dtype
    return {
      "ema": jnp.zeros((batch, self.d_model, self.ndim), jnp.float32),
      "k": jnp.zeros((batch, max_len, self.zdim), dtype),
      "v": jnp.zeros((batch, max_len, self.d_model), dtype),
    }

  gates_residual = True  # The block passes the residual stream as `residual_btd`.
  decode_inexact = None  # EMA state + KV cache: decoding equals the full forward.

  def __call__(
    self,
    x_btd,
    *,
    positions_bt,
    segment_ids_bt=None,
    cache=None,
    cache_index=None,
    residual_btd=None,
  ):
    """Applies the layer; arguments as in `Attention.__call__`.

    Args:
      x_btd: The (normalised) layer input, [b, t, D].
      positions_bt: Unused (the EMA carries position information).
      segment_ids_bt: Must be None.
      cache: Optional decoding cache from `init_cache`.
      cache_index: Scalar int, the cache slot of the first input token.
      residual_btd: The residual stream X the update gate interpolates towards, [b, t, D];
        default x_btd (a standalone layer whose input is its residual).

    Returns:
      (the residual update u ⊙ (Ĥ - X) [b, t, D], updated cache or None).
    """
    del positions_bt  # The EMA carries position information.
    if segment_ids_bt is not None:
      raise ValueError("mega attention does not support segment_ids (packed sequences)")
    x32 = x_btd.astype(jnp.float32)
    if cache is None:
      ema = self.ema(x_btd)
    else:
      ema, state = self.ema_steps(x_btd, cache["ema"])
    omega = self.omega[...].astype(jnp.float32)
    xp = jax.nn.silu(ema + omega * x32).astype(self.dtype)  # X' [b, t, D]
    z = jax.nn.silu(self.z(xp))  # [b, t, z]
    kappa, mu = self.kappa[...].astype(self.dtype), self.mu[...].astype(self.dtype)
    q, k = z * kappa[0] + mu[0], z * kappa[1] + mu[1]
    v = jax.nn.silu(self.v(x_btd))  # [b, t, D]

    if cache is None:
      o, new_cache = self.attend(q, k, v), None
    else:
      index = jnp.asarray(cache_index, jnp.int32)
      k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0))
      v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0))
      o = self.attend_cached(q, k_all, v_all, index)
      new_cache = {"ema": state, "k": k_all, "v": v_all}

    r = jax.nn.silu(self.reset(xp))
    u = jax.nn.sigmoid(self.update(xp))
    h_hat = jax.nn.silu(self.hx(xp) + self.h(r * o.astype(self.dtype)))
    residual = (x_btd if residual_btd is None else residual_btd).astype(self.dtype)
    return (u * (h_hat - residual)).astype(self.dtype), new_cache

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Single-head softmax attention [b, t, D] within chunks, or over everything when c is 0.

    Chunked attention runs on [b * t/c, c, c] score blocks: O(cTz) time and memory.
    """
    b, t, _ = q.shape
    c = self.chunk_size if self.chunk_size and self.chunk_size < t else t
    pad = -t % c
    n = (t + pad) // c
    blocks = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0))).reshape(b * n, c, a.shape[-1])  # noqa: E731
    pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b * n, c))
    valid = jnp.broadcast_to((jnp.arange(t + pad) < t).reshape(1, n, c), (b, n, c))
    mask = chunk_mask(pos, pos, 0, self.causal) & valid.reshape(b * n, 1, c)
    out = _softmax_attention(blocks(q), blocks(k), blocks(v), mask)
    return out.reshape(b, t + pad, -1)[:, :t]

  def attend_cached(self, q, k_all, v_all, index) -> jax.Array:
    """Attention of queries at index.. over the cache, masked to their chunk, [b, t, D]."""
    b, t, _ = q.shape
    s = k_all.shape[1]
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_pos = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = chunk_mask(q_pos, kv_pos, self.chunk_size, self.causal) & (kv_pos < index + t)[:, None]
    return _softmax_attention(q, k_all.astype(self.dtype), v_all.astype(self.dtype), mask)


def _softmax_attention(q, k, v, mask) -> jax.Array:
  """softmax(q kᵀ/√z + mask) v for one head: q, k [b, t|s, z], v [b, s, D], mask [b, t, s]."""
  scores = jnp.einsum("btz,bsz->bts", q, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask, scores * q.shape[-1] ** -0.5, NEG_INF)
  probs = jax.nn.softmax(scores, -1) * mask.any(-1, keepdims=True)
  return jnp.einsum("bts,bsd->btd", probs.astype(v.dtype), v)


@MIXERS.register("mega")
def _mega(cfg, *, causal: bool, rngs: nnx.Rngs) -> MegaAttention:
  options = mixer_options(cfg, "mega", DEFAULTS)
  zdim = check_int("mega", "zdim", options["zdim"], 0, "an integer >= 0 (0 = head_dim)")
  zdim = zdim or cfg.resolved_head_dim
  return MegaAttention(
    cfg.d_model,
    ndim=options["ndim"],
    zdim=zdim,
    chunk_size=options["chunk_size"],
    causal=causal,
    **layer_kwargs(cfg, rngs),
  )

"""Mamba: a selective state-space sequence mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces").

Algorithm, for an input X [b, t, D] with E = expand·D inner channels and N = d_state:
  1. x = X W_x, z = X W_z  [b, t, E].
  2. u = silu(causal depthwise conv1d(x) + b_conv), width d_conv, one filter per channel.
  3. Input-dependent ("selective") parameters: Δ = softplus((u W_r) W_Δ + b_Δ) [b, t, E] through a
     rank-R bottleneck; B = u W_B, C = u W_C [b, t, N]. A = -exp(A_log) [E, N] (S4D-real init
     A_{e,n} = -(n + 1)), skip D [E].
  4. Selective scan, per channel e with state h [E, N]:
        h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t u_t) B_t,    y_t = h_t C_t + D ⊙ u_t.
  5. out = (y ⊙ silu(z)) W_out.

Parallel form: the linear recurrence h_t = a_t h_{t-1} + b_t is associative in (a, b), so within a
chunk of c tokens `jax.lax.associative_scan` gives every h_t from the chunk's start state; a
`lax.scan` over chunks carries the state. Only one chunk's [b, c, E, N] tensors exist at a time and
the chunk body is rematerialised in the backward pass, so memory is linear in T with a
c·E·N-per-sequence working set (the full [T, E, N] state history is never stored). exp(Δ A) <= 1,
so products of decays only underflow towards 0, never overflow.

Decoding: the state is constant-size, {"conv": [b, d_conv - 1, E] (the last inputs of the conv),
"ssm": [b, E, N]}. A cached call with t >= 1 tokens (prefill or one-token decode) runs the same
chunked scan continuing from the state; a full forward is the same computation from a zero state.

Causal only: the builder raises for an encoder (causal=False). Segment ids act as a padding mask:
padded tokens (id 0) enter the conv as zeros, get Δ = 0 (the state passes through unchanged) and
output zeros, so left padding is exactly invisible; packed sequences are not separated, and a
conv window spanning mid-sequence padding sees zeros there instead of the earlier real tokens.
The conv runs in the compute dtype; the scan and the state are float32.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reslm.models.chunks import from_chunks, to_chunks
from reslm.models.linear import Linear, fused_linear
from reslm.models.registry import (
  MIXERS,
  check_int,
  check_option,
  is_number,
  layer_kwargs,
  mixer_options,
)
from reslm.models.sharding import param

DEFAULTS = {
  "expand": 2,
  "d_state": 16,
  "d_conv": 4,
  "dt_rank": 0,  # 0: ceil(d_model / 16).
  "chunk_size": 64,
  "dt_min": 0.001,
  "dt_max": 0.1,
}


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _dt_bias(key, width: int, dt_min: float, dt_max: float, dtype) -> jax.Array:
  """softplus⁻¹(Δ₀) with Δ₀ log-uniform in [dt_min, dt_max] (floored at 1e-4), [width]."""
  log_lo, log_hi = math.log(dt_min), math.log(dt_max)
  dt = jnp.exp(jax.random.uniform(key, (width,)) * (log_hi - log_lo) + log_lo)
  dt = jnp.maximum(dt, 1e-4)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _combine(first, second):
  """Composes h -> a1 h + b1 then h -> a2 h + b2 (first is earlier in time)."""
  a1, b1 = first
  a2, b2 = second
  return a1 * a2, a2 * b1 + b2


def selective_scan(u, delta, a, b, c, d, *, chunk_size: int, state=None, unroll=1):
  """y_t = h_t C_t + D u_t with h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t, chunked.

  Args:
    u: Inputs, [batch, t, E].
    delta: Step sizes Δ >= 0, [batch, t, E].
    a: Negative state matrix diagonal A, [E, N].
    b, c: Input and output matrices B, C, [batch, t, N].
    d: Skip D, [E].
    chunk_size: Tokens per associative-scan chunk (capped at t).
    state: Optional start state h [batch, E, N]; zeros if None.
    unroll: Passed to the `lax.scan` over chunks.

  Returns:
    (y [batch, t, E] float32, final state [batch, E, N] float32).
  """
  bsz, t, e = u.shape
  n = a.shape[-1]
  u, delta, b, c, a, d = (v.astype(jnp.float32) for v in (u, delta, b, c, a, d))
  if state is None:
    state = jnp.zeros((bsz, e, n), jnp.float32)
  size = min(chunk_size, t)

  @jax.checkpoint  # Recompute a chunk's [b, c, E, N] tensors in the backward pass.
  def chunk(h, xs):
    cu, cdelta, cb, cc = xs  # [b, c, E], [b, c, E], [b, c, N], [b, c, N]
    decay = jnp.exp(cdelta[..., None] * a)  # [b, c, E, N]
    drive = (cdelta * cu)[..., None] * cb[:, :, None, :]  # [b, c, E, N]
    decay, drive = jax.lax.associative_scan(_combine, (decay, drive), axis=1)
    hs = decay * h[:, None] + drive  # [b, c, E, N]: the state after each token
    return hs[:, -1], jnp.einsum("bcen,bcn->bce", hs, cc)

  # Zero padding of the last chunk has Δ = 0: decay 1 and no drive, so the final state is exact.
  xs = tuple(to_chunks(v, size) for v in (u, delta, b, c))
  state, y = jax.lax.scan(chunk, state.astype(jnp.float32), xs, unroll=unroll)
  return from_chunks(y, t) + u * d, state


class Mamba(nnx.Module):
  """The Mamba mixer (causal); decodes with a constant-size conv + SSM state.

  Args:
    d_model: Model width D.
    expand: Inner width E = expand * D.
    d_state: SSM state size N per channel.
    d_conv: Width of the causal depthwise convolution.
    dt_rank: Rank R of the Δ projection; 0 = ceil(D / 16).
    chunk_size: Tokens per associative-scan chunk.
    dt_min, dt_max: Range of the initial step sizes Δ (log-uniform), via the bias of W_Δ.
    init_std: Initialiser std of W_x, W_z and of W_r, W_B, W_C (one projection, `x_proj`).
    out_init_std: Initialiser std of W_out.
    dtype: Compute dtype.
    param_dtype: Storage dtype.
    rngs: Random streams.
  """

  decode_inexact = None  # The conv + SSM state is cached: decoding equals the full forward.

  def __init__(
    self,
    d_model: int,
    *,
    expand: int = 2,
    d_state: int = 16,
    d_conv: int = 4,
    dt_rank: int = 0,
    chunk_size: int = 64,
    dt_min: float = 0.001,
    dt_max: float = 0.1,
    init_std: float = 0.02,
    out_init_std: float = 0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    for name, value in (("expand", expand), ("d_state", d_state), ("d_conv", d_conv)):
      check_int("mamba", name, value, 1)
    check_int("mamba", "dt_rank", dt_rank, 0, "an integer >= 0 (0 = ceil(d_model / 16))")
    check_int("mamba", "chunk_size", chunk_size, 1)
    for name, value in (("dt_min", dt_min), ("dt_max", dt_max)):
      check_option("mamba", name, value, is_number(value) and value > 0, "a number > 0")
    check_option("mamba", "dt_min", dt_min, dt_min <= dt_max, f"at most dt_max={dt_max!r}")
    e = expand * d_model
    rank = dt_rank or math.ceil(d_model / 16)
    self.d_inner, self.d_state, self.d_conv = e, d_state, d_conv
    self.chunk_size = chunk_size
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_x = Linear(d_model, e, axes=("embed", "mlp"), init_std=init_std, **kw)
    self.in_z = Linear(d_model, e, axes=("embed", "mlp"), init_std=init_std, **kw)
    # Depthwise conv: PyTorch's default init for a conv with fan-in d_conv.
    bound = 1.0 / math.sqrt(d_conv)

    def uniform(shape, lo, hi):
      return jax.random.uniform(rngs.params(), shape, param_dtype, lo, hi)

    self.conv_w = param(uniform((d_conv, e), -bound, bound), (None, "mlp"))
    self.conv_b = param(uniform((e,), -bound, bound), ("mlp",))
    # Δ's low-rank input, B and C from one projection of u: [R | N | N].
    self.x_proj = Linear(e, rank + 2 * d_state, axes=("mlp", None), init_std=init_std, **kw)
    # Mamba's Δ init: W_Δ ~ U(±R^-1/2); softplus(b_Δ) log-uniform in [dt_min, dt_max].
    self.dt_w = param(uniform((rank, e), -(rank**-0.5), rank**-0.5), (None, "mlp"))
    self.dt_b = param(_dt_bias(rngs.params(), e, dt_min, dt_max, param_dtype), ("mlp",))
    s4d_real = np.broadcast_to(np.log(np.arange(1, d_state + 1, dtype=np.float32)), (e, d_state))
    self.a_log = param(jnp.asarray(s4d_real, param_dtype), ("mlp", "state"))
    self.d = param(jnp.asarray(np.ones(e), param_dtype), ("mlp",))
    self.out = Linear(e, d_model, axes=("mlp", "embed"), init_std=out_init_std, **kw)

  def init_cache(self, batch: int, max_len: int = 0, dtype=None) -> dict[str, jax.Array]:
    """A zero state {"conv": [b, d_conv - 1, E], "ssm": [b, E, N]} (float32); max_len is unused."""
    del max_len, dtype  # The state does not grow with the sequence.
    return {
      "conv": jnp.zeros((batch, self.d_conv - 1, self.d_inner), jnp.float32),
      "ssm": jnp.zeros((batch, self.d_inner, self.d_state), jnp.float32),
    }

  def __call__(self, x_btd, *, positions_bt, segment_ids_bt=None, cache=None, cache_index=None):
    """Applies the mixer; arguments and returns as in `Attention.__call__`.

    With `cache`, the input continues the sequence the state summarises (cache_index is unused).
    """
    del positions_bt, cache_index  # Order is carried by the conv and the recurrence.
    b, t, _ = x_btd.shape
    x, z = fused_linear(x_btd, (self.in_x, self.in_z))  # [b, t, E]
    valid = None if segment_ids_bt is None else (segment_ids_bt != 0)[..., None]
    if valid is not None:
      x = x * valid.astype(x.dtype)
    state = cache if cache is not None else self.init_cache(b)
    xc = jnp.concatenate([state["conv"].astype(x.dtype), x], axis=1)  # [b, d_conv - 1 + t, E]
    w = self.conv_w[...].astype(x.dtype)
    conv = sum(w[k] * xc[:, k : k + t] for k in range(self.d_conv))
    u = jax.nn.silu(conv + self.conv_b[...].astype(x.dtype))  # [b, t, E]
    proj = self.x_proj(u)  # [b, t, R + 2N]
    rank = self.dt_w.shape[0]
    dt_low, b_mat, c_mat = jnp.split(proj, [rank, rank + self.d_state], axis=-1)
    dt = dt_low @ self.dt_w[...].astype(self.dtype) + self.dt_b[...].astype(self.dtype)
    delta = jax.nn.softplus(dt.astype(jnp.float32))  # [b, t, E]
    if valid is not None:
      u, delta = u * valid.astype(u.dtype), delta * valid
    a = -jnp.exp(self.a_log[...].astype(jnp.float32))  # [E, N]
    y, h = selective_scan(
      u, delta, a, b_mat, c_mat, self.d[...], chunk_size=self.chunk_size, state=state["ssm"]
    )
    out = self.out(y.astype(self.dtype) * jax.nn.silu(z))
    if valid is not None:
      out = out * valid.astype(out.dtype)
    if cache is None:
      return out, None
    keep = xc[:, xc.shape[1] - (self.d_conv - 1) :]  # The last d_conv - 1 conv inputs.
    return out, {"conv": keep.astype(jnp.float32), "ssm": h}


@MIXERS.register("mamba")
def _mamba(cfg, *, causal: bool, rngs: nnx.Rngs) -> Mamba:
  if not causal:
    raise ValueError(
      "model.mixer='mamba' is causal only; an encoder (model.kind='encoder') needs a "
      "bidirectional mixer"
    )
  options = mixer_options(cfg, "mamba", DEFAULTS)
  return Mamba(
    cfg.d_model,
    **options,
    **layer_kwargs(cfg, rngs),
  )

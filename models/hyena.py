"""Hyena (Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models").

Algorithm, order N, for an input u [b, t, D]:
  1. A projection to N + 1 streams of width D, then a short depthwise causal convolution (width 3)
     on each: x_1 .. x_N and v, each [b, t, D].
  2. Implicit long filters, one per order and channel: h_n(t) = window(t) · FFN(PE(t)).
     PE(t) = [t/L, cos(2π f_k t/L), sin(2π f_k t/L)] for `(emb_dim - 1) / 2` bands f_k, with
     L = max_seq_len; the FFN has two hidden layers with sin(ω ⊙ ·) activations (ω learned per unit,
     initialised to `filter_freq`); window(t) = exp(-α_c t/L) decays at a fixed rate per channel,
     channel c reaching 1e-2 somewhere between t = 0.3 L and t = 1.5 L (fast to slow channels).
  3. Recurrence: z = v; for n = 1..N: z = x_n ⊙ (h_n * z + β_n ⊙ z), where * is the long causal
     convolution and β_n a learned per-channel skip (the filter's bias); output = W_out z.
The long convolution multiplies FFTs (rfft/irfft in float32, zero-padded to a power of two >= 2t,
so nothing wraps around): O(t log t) per channel. The recurrence runs in float32.

Encoder (causal=False): the filters are two-sided; a second FFN head gives h_n at negative lags
(lag 0 comes from the causal head). The short convolution stays causal. Segment ids act as a
padding mask only (padded tokens feed nothing into real ones); packed sequences are not separated.

Decoding: Hyena has no constant-size state. The cache holds the short convolution's window (the
last 2 projections) and the input z_{n-1} of every long convolution at every past position,
[b, max_len, N, D] float32; new tokens are computed with the direct sum
Σ_{s <= t} h_n(t - s) z_{n-1}(s), O(max_len · D) per token and order.

The filters are defined on max_seq_len positions: a longer input (or cache) raises a ValueError.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention.base import mixer_options
from models.linear import Linear
from models.registry import MIXERS
from models.sharding import param

DEFAULTS = {"order": 2, "filter_hidden": 64, "emb_dim": 17, "filter_freq": 1.0}
SHORT_CONV = 3  # Width of the short depthwise convolution on the projected streams.
DECAY_TARGET = 1e-2  # The window value channel c reaches at t = reach_c · L ...
DECAY_REACH = (0.3, 1.5)  # ... with reach_c spaced linearly over the channels.


def is_int(value, low: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_option(mixer: str, name: str, value, ok: bool, allowed: str) -> None:
  """Raises a one-line ValueError naming the setting unless `ok`."""
  if not ok:
    raise ValueError(f"model.mixer_options.{name}={value!r} is not allowed for {mixer}: {allowed}")


def check_length(mixer: str, length: int, max_len: int, what: str = "sequence length") -> None:
  """Filters exist for max_seq_len positions only; longer inputs raise a one-line ValueError."""
  if length > max_len:
    raise ValueError(
      f"{mixer}: {what} {length} exceeds model.max_seq_len={max_len}, the number of positions its "
      "long filters are defined for; raise model.max_seq_len"
    )


def decay_rates(channels: int) -> jax.Array:
  """α_c [channels]: window exp(-α_c t/L) equals DECAY_TARGET at t = reach_c · L."""
  reach = jnp.linspace(*DECAY_REACH, channels, dtype=jnp.float32)
  return -math.log(DECAY_TARGET) / reach


def decay_window(length: int, max_len: int, channels: int) -> jax.Array:
  """exp(-α_c t / max_len) for t < length, [length, channels] float32."""
  t = jnp.arange(length, dtype=jnp.float32)[:, None]
  return jnp.exp(-decay_rates(channels)[None] * t / max_len)


def positional_features(length: int, max_len: int, emb_dim: int) -> jax.Array:
  """[length, emb_dim]: t/L, then cos and sin of 2π f_k t/L for (emb_dim - 1) / 2 bands f_k."""
  bands = (emb_dim - 1) // 2
  t = jnp.arange(length, dtype=jnp.float32)[:, None] / max_len
  f = jnp.linspace(1e-4, bands - 1, bands, dtype=jnp.float32)  # Near 0 up to bands - 1 cycles.
  angle = 2 * jnp.pi * f[None] * t
  return jnp.concatenate([t, jnp.cos(angle), jnp.sin(angle)], axis=-1)


def kernel_layout(h_fwd: jax.Array, h_bwd: jax.Array | None, n: int) -> jax.Array:
  """A circular-convolution kernel [n, D] from per-lag filters, n >= 2t.

  Args:
    h_fwd: Filter at lags 0..t-1, [t, D].
    h_bwd: Optional filter at lags 0, -1, .., -(t-1) (entry l is lag -l; entry 0 is unused), [t, D].
    n: Transform length; lag -l lands at n - l, beyond every causal lag.
  """
  t, d = h_fwd.shape
  parts = [h_fwd, jnp.zeros((n - 2 * t + 1, d), h_fwd.dtype)]
  if h_bwd is not None:
    parts.append(h_bwd[1:][::-1])
  else:
    parts.append(jnp.zeros((t - 1, d), h_fwd.dtype))
  return jnp.concatenate(parts, axis=0)


def fft_conv(z_btd: jax.Array, h_fwd: jax.Array, h_bwd: jax.Array | None = None) -> jax.Array:
  """y_t = Σ_s h(t - s) z_s per channel by FFT: causal, or two-sided when h_bwd is given.

  Args:
    z_btd: Input, [b, t, D].
    h_fwd: Filter at lags 0..t-1, [t, D].
    h_bwd: Optional filter at negative lags, as in `kernel_layout`.

  Returns:
    [b, t, D] float32.
  """
  t = z_btd.shape[1]
  n = 1 << (2 * t - 1).bit_length()  # The smallest power of two >= 2t.
  k = kernel_layout(h_fwd.astype(jnp.float32), h_bwd, n)
  zf = jnp.fft.rfft(z_btd.astype(jnp.float32), n=n, axis=1)
  kf = jnp.fft.rfft(k, n=n, axis=0)
  return jnp.fft.irfft(zf * kf[None], n=n, axis=1)[:, :t]


def direct_causal_conv(z_bsd: jax.Array, h_sd: jax.Array, q_pos_t: jax.Array) -> jax.Array:
  """y_i = Σ_{s <= q_i} h(q_i - s) z_s over a cache of s slots, for query positions q [t].

  Args:
    z_bsd: Cached inputs, [b, s, D] (slots after q_i are ignored).
    h_sd: Filter at lags 0..s-1, [s, D].
    q_pos_t: Positions of the outputs, int [t].

  Returns:
    [b, t, D] float32.
  """
  s = z_bsd.shape[1]
  lag = q_pos_t[:, None] - jnp.arange(s, dtype=q_pos_t.dtype)[None, :]  # [t, s]
  k = jnp.where((lag >= 0)[..., None], h_sd.astype(jnp.float32)[jnp.clip(lag, 0, s - 1)], 0.0)
  return jnp.einsum("tsd,bsd->btd", k, z_bsd.astype(jnp.float32))


class ShortConv(nnx.Module):
  """Depthwise causal convolution y_t = b + Σ_{j < width} w_j ⊙ u_{t-j} over trailing channels.

  Args:
    channels: Trailing channel shape, e.g. (streams, d_model).
    width: Taps per channel.
    axes: Logical names of the channel axes.
    dtype: Compute dtype.
    param_dtype: Storage dtype.
    rngs: Random streams.
  """

  def __init__(self, channels, width: int, *, axes, dtype=jnp.float32, param_dtype, rngs):
    self.width = width
    self.dtype = dtype
    shape = (width, *channels)
    self.weight = param(
      width**-0.5 * jax.random.normal(rngs.params(), shape, param_dtype), (None, *axes)
    )
    self.bias = param(jnp.zeros(channels, param_dtype), tuple(axes))

  def init_state(self, batch: int) -> jax.Array:
    """The last width - 1 inputs before the sequence start (zeros), [b, width - 1, *channels]."""
    return jnp.zeros((batch, self.width - 1, *self.weight.shape[1:]), self.dtype)

  def __call__(self, u_btc: jax.Array, state: jax.Array | None = None):
    """Returns (y [b, t, *channels], new state: the last width - 1 inputs)."""
    k, t = self.width, u_btc.shape[1]
    u = u_btc.astype(self.dtype)
    state = self.init_state(u.shape[0]) if state is None else state.astype(self.dtype)
    ext = jnp.concatenate([state, u], axis=1)  # [b, k - 1 + t, *channels]
    w = self.weight[...].astype(self.dtype)
    y = self.bias[...].astype(self.dtype) + sum(
      w[j] * ext[:, k - 1 - j : k - 1 - j + t] for j in range(k)
    )
    return y, ext[:, ext.shape[1] - (k - 1) :]


class ImplicitFilter(nnx.Module):
  """h(t) = window(t) · FFN(PE(t)) for every order (and direction) and channel.

  Args:
    order: Filters per channel (one per Hyena order).
    channels: d_model.
    max_len: L, the positions the filters are defined for (scales PE and the window).
    emb_dim: Positional features (odd: t plus sin/cos bands).
    hidden: FFN width.
    freq: Initial sin frequency ω.
    two_sided: Whether to add a head for negative lags.
    param_dtype: Storage dtype.
    rngs: Random streams.
  """

  def __init__(
    self, order, channels, *, max_len, emb_dim, hidden, freq, two_sided, param_dtype, rngs
  ):
    self.order, self.channels, self.max_len, self.emb_dim = order, channels, max_len, emb_dim
    self.directions = 2 if two_sided else 1
    kw = dict(use_bias=True, param_dtype=param_dtype, rngs=rngs)
    self.inp = Linear(emb_dim, hidden, axes=(None, None), init_std=emb_dim**-0.5, **kw)
    self.mid = Linear(hidden, hidden, axes=(None, None), init_std=hidden**-0.5, **kw)
    out = (self.directions, order, channels)
    self.out = Linear(hidden, out, axes=(None, None, None, "mlp"), init_std=hidden**-0.5, **kw)
    self.freq = param(jnp.full((2, hidden), freq, param_dtype), (None, None))

  def ffn(self, length: int) -> jax.Array:
    """The unwindowed filters at lags 0..length-1, [length, directions, order, D] float32."""
    w = self.freq[...].astype(jnp.float32)
    a = jnp.sin(w[0] * self.inp(positional_features(length, self.max_len, self.emb_dim)))
    a = jnp.sin(w[1] * self.mid(a))
    return self.out(a)

  def __call__(self, length: int):
    """(causal filters [length, order, D], negative-lag filters or None), float32."""
    h = self.ffn(length) * decay_window(length, self.max_len, self.channels)[:, None, None]
    return h[:, 0], (h[:, 1] if self.directions == 2 else None)


class Hyena(nnx.Module):
  """The Hyena operator of order N; decodes from a cache of every past position.

  Args:
    d_model: Model width D.
    max_seq_len: Positions the implicit filters are defined for.
    order: N, the number of gated long convolutions.
    filter_hidden: Width of the filter FFN.
    emb_dim: Positional features of the filter FFN (odd, >= 3).
    filter_freq: Initial frequency of the FFN's sin activations.
    causal: Causal (decoder) or two-sided (encoder) long filters.
    init_std: Initialiser std of the input projection.
    out_init_std: Initialiser std of the output projection.
    dtype: Compute dtype (the long convolutions and recurrence run in float32).
    param_dtype: Storage dtype.
    rngs: Random streams.
  """

  def __init__(
    self,
    d_model: int,
    *,
    max_seq_len: int,
    order: int = 2,
    filter_hidden: int = 64,
    emb_dim: int = 17,
    filter_freq: float = 1.0,
    causal: bool = True,
    init_std: float = 0.02,
    out_init_std: float = 0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    check_option("hyena", "order", order, is_int(order, 1), "an integer >= 1")
    check_option(
      "hyena", "filter_hidden", filter_hidden, is_int(filter_hidden, 1), "an integer >= 1"
    )
    check_option(
      "hyena", "emb_dim", emb_dim, is_int(emb_dim, 3) and emb_dim % 2 == 1, "an odd integer >= 3"
    )
    positive = isinstance(filter_freq, int | float) and not isinstance(filter_freq, bool)
    check_option(
      "hyena", "filter_freq", filter_freq, positive and filter_freq > 0, "a positive number"
    )
    self.d_model, self.order, self.max_seq_len = d_model, order, max_seq_len
    self.causal = causal
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_proj = Linear(
      d_model,
      (order + 1, d_model),
      axes=("embed", None, "mlp"),
      use_bias=True,
      init_std=init_std,
      **kw,
    )
    self.short_conv = ShortConv((order + 1, d_model), SHORT_CONV, axes=(None, "mlp"), **kw)
    self.filter = ImplicitFilter(
      order,
      d_model,
      max_len=max_seq_len,
      emb_dim=emb_dim,
      hidden=filter_hidden,
      freq=float(filter_freq),
      two_sided=not causal,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.skip = param(jnp.ones((order, d_model), param_dtype), (None, "mlp"))
    self.out_proj = Linear(
      d_model, d_model, axes=("mlp", "embed"), use_bias=True, init_std=out_init_std, **kw
    )

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """{"conv": last 2 projections [b, 2, N+1, D], "z": long-conv inputs [b, max_len, N, D] f32}."""
    del dtype
    check_length("hyena", max_len, self.max_seq_len, what="cache length")
    return {
      "conv": self.short_conv.init_state(batch),
      "z": jnp.zeros((batch, max_len, self.order, self.d_model), jnp.float32),
    }

  def streams(self, x_btd, valid=None, conv_state=None):
    """Projected, short-convolved streams [b, t, N+1, D] (x_1..x_N, v) and the conv state."""
    u = self.in_proj(x_btd)
    if valid is not None:
      u = u * valid[:, :, None, None]  # Padded tokens feed nothing into the short convolution.
    return self.short_conv(u, conv_state)

  def __call__(self, x_btd, *, positions_bt, segment_ids_bt=None, cache=None, cache_index=None):
    """Applies the operator; arguments and returns as in `Attention.__call__`."""
    del positions_bt  # Position enters through the filters.
    if cache is not None:
      return self.decode(x_btd, cache, cache_index, segment_ids_bt)
    t = x_btd.shape[1]
    check_length("hyena", t, self.max_seq_len)
    valid = None if segment_ids_bt is None else (segment_ids_bt != 0).astype(jnp.float32)
    u, _ = self.streams(x_btd, valid)
    h_fwd, h_bwd = self.filter(t)  # [t, N, D] each
    skip = self.skip[...].astype(jnp.float32)
    z = u[:, :, self.order].astype(jnp.float32)  # v
    for n in range(self.order):
      if valid is not None:
        z = z * valid[:, :, None]
      y = fft_conv(z, h_fwd[:, n], None if h_bwd is None else h_bwd[:, n]) + skip[n] * z
      z = u[:, :, n].astype(jnp.float32) * y
    return self.out_proj(z.astype(self.dtype)), None

  def decode(self, x_btd, cache, cache_index, segment_ids_bt):
    """Tokens at cache_index.. against the cache, by direct causal sums; returns (out, cache)."""
    if segment_ids_bt is not None or not self.causal:
      raise ValueError("hyena decodes only causally and without segment_ids")
    s = cache["z"].shape[1]
    check_length("hyena", s, self.max_seq_len, what="cache length")
    index = jnp.asarray(cache_index, jnp.int32)
    q_pos = index + jnp.arange(x_btd.shape[1], dtype=jnp.int32)
    u, conv = self.streams(x_btd, conv_state=cache["conv"])
    h, _ = self.filter(s)  # [s, N, D]
    skip = self.skip[...].astype(jnp.float32)
    zs = cache["z"]
    z = u[:, :, self.order].astype(jnp.float32)
    for n in range(self.order):
      zs = jax.lax.dynamic_update_slice(zs, z[:, :, None], (0, index, n, 0))
      y = direct_causal_conv(zs[:, :, n], h[:, n], q_pos) + skip[n] * z
      z = u[:, :, n].astype(jnp.float32) * y
    return self.out_proj(z.astype(self.dtype)), {"conv": conv, "z": zs}


@MIXERS.register("hyena")
def _hyena(cfg, *, causal: bool, rngs: nnx.Rngs) -> Hyena:
  options = mixer_options(cfg, "hyena", DEFAULTS)
  return Hyena(
    cfg.d_model,
    max_seq_len=cfg.max_seq_len,
    causal=causal,
    init_std=cfg.init_std,
    out_init_std=cfg.out_init_std,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.storage_dtype,
    rngs=rngs,
    **options,
  )

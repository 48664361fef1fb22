"""Building blocks shared by the long-convolution mixers (Hyena, Monarch Mixer).

A short depthwise causal convolution (`ShortConv`), the fixed exponential decay window that
regularises the long filters, the circular layout of a causal or two-sided filter for an FFT-style
convolution, the direct causal sum used when decoding against a cache, and `LongConvMixer`, the
call / decode / cache plumbing both mixers share. Long filters are defined on max_seq_len
positions: a longer input (or cache) raises a one-line ValueError (`check_length`).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.sharding import param

SHORT_CONV = 3  # Width of the short depthwise convolution on the projected streams.
DECAY_TARGET = 1e-2  # The window value channel c reaches at t = reach_c · L ...
DECAY_REACH = (0.3, 1.5)  # ... with reach_c spaced linearly over the channels.


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


class LongConvMixer(nnx.Module):
  """Shared plumbing of the gated long-convolution mixers (Hyena, Monarch Mixer).

  Inputs become streams [b, t, streams, D] (a projection, then a `ShortConv`); padded tokens feed
  nothing into the short convolution. Lengths are checked against max_seq_len. The decoding cache
  is {"conv": the short convolution's window, "z": the long convolutions' inputs at every past
  position [b, max_len, *z_shape] float32}.

  Subclasses set `name` (for errors), `max_seq_len`, `causal`, `short_conv` and `z_shape`, and
  define `project(x_btd)` (the streams before the short convolution), `mix(u, valid)` (the full
  sequence from the streams; valid is a float [b, t] mask or None) and
  `mix_cached(u, zs, index, q_pos)` (new tokens against the cache; returns (out, updated zs)).
  """

  name = "long convolution"
  decode_inexact = None  # Every past input is cached: decoding equals the full forward.

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """{"conv": the short conv's zero window, "z": zeros [b, max_len, *z_shape] float32}."""
    del dtype
    check_length(self.name, max_len, self.max_seq_len, what="cache length")
    return {
      "conv": self.short_conv.init_state(batch),
      "z": jnp.zeros((batch, max_len, *self.z_shape), jnp.float32),
    }

  def streams(self, x_btd, valid=None, conv_state=None):
    """Projected, short-convolved streams [b, t, streams, D] and the short convolution's state."""
    u = self.project(x_btd)
    if valid is not None:
      u = u * valid[:, :, None, None]  # Padded tokens feed nothing into the short convolution.
    return self.short_conv(u, conv_state)

  def __call__(self, x_btd, *, positions_bt, segment_ids_bt=None, cache=None, cache_index=None):
    """Applies the mixer; arguments and returns as in `Attention.__call__`."""
    del positions_bt  # Position enters through the long filters.
    if cache is not None:
      return self.decode(x_btd, cache, cache_index, segment_ids_bt)
    check_length(self.name, x_btd.shape[1], self.max_seq_len)
    valid = None if segment_ids_bt is None else (segment_ids_bt != 0).astype(jnp.float32)
    u, _ = self.streams(x_btd, valid)
    return self.mix(u, valid), None

  def decode(self, x_btd, cache, cache_index, segment_ids_bt):
    """Tokens at cache_index.. against the cache, by direct causal sums; returns (out, cache)."""
    if segment_ids_bt is not None or not self.causal:
      raise ValueError(f"{self.name} decodes only causally and without segment_ids")
    check_length(self.name, cache["z"].shape[1], self.max_seq_len, what="cache length")
    index = jnp.asarray(cache_index, jnp.int32)
    q_pos = index + jnp.arange(x_btd.shape[1], dtype=jnp.int32)
    u, conv = self.streams(x_btd, conv_state=cache["conv"])
    out, zs = self.mix_cached(u, cache["z"], index, q_pos)
    return out, {"conv": conv, "z": zs}

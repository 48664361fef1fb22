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

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.linear import Linear
from reslm.models.longconv import (
  SHORT_CONV,
  LongConvMixer,
  ShortConv,
  decay_window,
  direct_causal_conv,
  kernel_layout,
)
from reslm.models.registry import (
  MIXERS,
  check_int,
  check_option,
  is_int,
  is_number,
  layer_kwargs,
  mixer_options,
)
from reslm.models.sharding import param

DEFAULTS = {"order": 2, "filter_hidden": 64, "emb_dim": 17, "filter_freq": 1.0}


def positional_features(length: int, max_len: int, emb_dim: int) -> jax.Array:
  """[length, emb_dim]: t/L, then cos and sin of 2π f_k t/L for (emb_dim - 1) / 2 bands f_k."""
  bands = (emb_dim - 1) // 2
  t = jnp.arange(length, dtype=jnp.float32)[:, None] / max_len
  f = jnp.linspace(1e-4, bands - 1, bands, dtype=jnp.float32)  # Near 0 up to bands - 1 cycles.
  angle = 2 * jnp.pi * f[None] * t
  return jnp.concatenate([t, jnp.cos(angle), jnp.sin(angle)], axis=-1)


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


class Hyena(LongConvMixer):
  """The Hyena operator of order N; decodes from a cache of every past position.

  Call, decoding and cache as in `LongConvMixer`; the cache's "z" is [b, max_len, N, D].

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

  name = "hyena"

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
    check_int("hyena", "order", order, 1)
    check_int("hyena", "filter_hidden", filter_hidden, 1)
    check_option(
      "hyena", "emb_dim", emb_dim, is_int(emb_dim, 3) and emb_dim % 2 == 1, "an odd integer >= 3"
    )
    check_option(
      "hyena",
      "filter_freq",
      filter_freq,
      is_number(filter_freq) and filter_freq > 0,
      "a positive number",
    )
    self.d_model, self.order, self.max_seq_len = d_model, order, max_seq_len
    self.z_shape = (order, d_model)
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

  def project(self, x_btd):
    """The N + 1 streams before the short convolution, [b, t, N+1, D]."""
    return self.in_proj(x_btd)

  def mix(self, u, valid):
    """The order-N recurrence over a whole sequence with FFT long convolutions."""
    t = u.shape[1]
    h_fwd, h_bwd = self.filter(t)  # [t, N, D] each
    skip = self.skip[...].astype(jnp.float32)
    z = u[:, :, self.order].astype(jnp.float32)  # v
    for n in range(self.order):
      if valid is not None:
        z = z * valid[:, :, None]
      y = fft_conv(z, h_fwd[:, n], None if h_bwd is None else h_bwd[:, n]) + skip[n] * z
      z = u[:, :, n].astype(jnp.float32) * y
    return self.out_proj(z.astype(self.dtype))

  def mix_cached(self, u, zs, index, q_pos):
    """The recurrence for new tokens, each long convolution a direct sum over the cache."""
    h, _ = self.filter(zs.shape[1])  # [s, N, D]
    skip = self.skip[...].astype(jnp.float32)
    z = u[:, :, self.order].astype(jnp.float32)
    for n in range(self.order):
      zs = jax.lax.dynamic_update_slice(zs, z[:, :, None], (0, index, n, 0))
      y = direct_causal_conv(zs[:, :, n], h[:, n], q_pos) + skip[n] * z
      z = u[:, :, n].astype(jnp.float32) * y
    return self.out_proj(z.astype(self.dtype)), zs


@MIXERS.register("hyena")
def _hyena(cfg, *, causal: bool, rngs: nnx.Rngs) -> Hyena:
  options = mixer_options(cfg, "hyena", DEFAULTS)
  return Hyena(
    cfg.d_model,
    max_seq_len=cfg.max_seq_len,
    causal=causal,
    **layer_kwargs(cfg, rngs),
    **options,
  )

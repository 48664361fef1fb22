"""AWQ (Lin et al., 2024): activation-aware per-input-channel scaling before weight quantization.

Input features with large activations matter most to the output. AWQ multiplies their weight
rows by s > 1 before round-to-nearest (so those rows lose relatively less precision) and divides
the input by s, which leaves the float function unchanged:

  y = x W = (x / s) (diag(s) W) ≈ (x / s) Q(diag(s) W)

with s = mean_tokens |x|^α, normalised by sqrt(max(s) · min(s)). α is searched over the grid
{0, 1/n, ..., (n-1)/n} for the smallest output error ‖XW − (X/s) Q(diag(s) W)‖² on the
calibration inputs; α = 0 is plain round-to-nearest, so AWQ never does worse there. The 1/s is
kept in the layer (`input_scale`); AWQ's weight-clipping search is not implemented.
"""

import functools

import jax
import jax.numpy as jnp

from reslm.compress.quantize import formats, rtn
from reslm.compress.registry import integer, one_of, register


def awq_scales(x_mk: jax.Array, alpha: jax.Array) -> jax.Array:
  """s [K] = mean|x|^α / sqrt(max · min) for one α."""
  mean_abs = jnp.mean(jnp.abs(x_mk.astype(jnp.float32)), axis=0)
  s = jnp.maximum(mean_abs, 1e-4) ** alpha
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "grid"))
def awq_search(w_kn, x_mk, *, bits: int, group_size: int, grid: int = 20):
  """The grid's best scales for w [K, N] on inputs x [M, K].

  Returns:
    (s [K], alpha, losses [grid]) with losses the mean squared output error per grid point.
  """
  x = x_mk.astype(jnp.float32)
  w = w_kn.astype(jnp.float32)
  ref = x @ w

  def loss(alpha):
    s = awq_scales(x, alpha)
    w_hat = rtn.quantize_dequantize(w * s[:, None], bits, group_size) / s[:, None]
    return jnp.mean((x @ w_hat - ref) ** 2)

  alphas = jnp.arange(grid, dtype=jnp.float32) / grid
  losses = jax.lax.map(loss, alphas)
  best = alphas[jnp.argmin(losses)]
  return awq_scales(x, best), best, losses


@register(
  "awq",
  stage="quantize",
  defaults={"bits": 4, "group_size": 128, "grid": 20},
  checks={"bits": one_of(4, 8), "group_size": one_of(*formats.GROUP_SIZES), "grid": integer(1)},
  needs_calibration=True,
)
def _awq(w_kn, x_mk, settings):
  """AWQ to int4 (group-wise) or int8 (per channel), 1/s kept as the layer's input scale."""
  bits, g = settings["bits"], settings["group_size"]
  s, _, _ = awq_search(w_kn, x_mk, bits=bits, group_size=g, grid=settings["grid"])
  scaled = w_kn.astype(jnp.float32) * s[:, None]
  if bits == 8:
    return rtn.int8_replacement(*formats.quantize_int8(scaled), input_scale=1.0 / s)
  q, scales = formats.quantize_int4(scaled, g)
  return rtn.int4_replacement(q, scales, g, input_scale=1.0 / s)

"""Normalisation layers. Axes: embed (the normalised feature axis)."""

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.registry import NORMS
from reslm.models.sharding import param


class RMSNorm(nnx.Module):
  """Root-mean-square norm (Zhang & Sennrich, 2019): x / rms(x) * scale, statistics in float32.

  Args:
    dim: Feature size.
    eps: Added to the mean square.
    dtype: Output dtype.
    param_dtype: Scale dtype.
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(jnp.ones((dim,), param_dtype), ("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """Layer norm (Ba et al., 2016) with scale and bias, statistics in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(jnp.ones((dim,), param_dtype), ("embed",))
    self.bias = param(jnp.zeros((dim,), param_dtype), ("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


@NORMS.register("rmsnorm")
def _rmsnorm(cfg, *, dim: int, rngs: nnx.Rngs) -> RMSNorm:
  del rngs
  return RMSNorm(dim, eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype)


@NORMS.register("layernorm")
def _layernorm(cfg, *, dim: int, rngs: nnx.Rngs) -> LayerNorm:
  del rngs
  return LayerNorm(dim, eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype)

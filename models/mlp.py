"""Position-wise MLPs. Axes: embed -> mlp -> embed."""

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.linear import Linear, fused_linear
from reslm.models.registry import MLPS, layer_kwargs


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)) (Shazeer, 2020).

  Args:
    dim: Model width.
    hidden: Hidden width.
    init_std: Initialiser std of the input projections.
    out_init_std: Initialiser std of the output projection (scaled down with depth).
    dtype, param_dtype: Compute and storage dtypes.
    rngs: Random streams.
  """

  decode_inexact = None  # Position-wise: cached decoding equals the full forward.

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
    self.gate = Linear(dim, hidden, axes=("embed", "mlp"), init_std=init_std, **kw)
    self.up = Linear(dim, hidden, axes=("embed", "mlp"), init_std=init_std, **kw)
    self.down = Linear(hidden, dim, axes=("mlp", "embed"), init_std=out_init_std, **kw)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    gate, up = fused_linear(x_btd, (self.gate, self.up))
    return self.down(jax.nn.silu(gate) * up)


class GeluMLP(nnx.Module):
  """down(gelu(up(x))) as in GPT-2 and BERT. Arguments as in `SwiGLU`."""

  decode_inexact = None  # Position-wise: cached decoding equals the full forward.

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
    self.up = Linear(dim, hidden, axes=("embed", "mlp"), use_bias=True, init_std=init_std, **kw)
    self.down = Linear(
      hidden, dim, axes=("mlp", "embed"), use_bias=True, init_std=out_init_std, **kw
    )

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x_btd)))


@MLPS.register("swiglu")
def _swiglu(cfg, *, rngs: nnx.Rngs) -> SwiGLU:
  return SwiGLU(cfg.d_model, cfg.mlp_dim, **layer_kwargs(cfg, rngs))


@MLPS.register("gelu")
def _gelu(cfg, *, rngs: nnx.Rngs) -> GeluMLP:
  return GeluMLP(cfg.d_model, cfg.mlp_dim, **layer_kwargs(cfg, rngs))

"""Position-wise MLPs. Axes: embed -> mlp -> embed."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.linear import Linear, fused_linear
from reslm.models.registry import MLPS, layer_kwargs

# `model.mlp_activation` names. "gelu" is the exact erf form (BERT, Hugging Face's "gelu");
# "gelu_tanh" the tanh approximation (GPT-2's "gelu_new", "gelu_pytorch_tanh").
ACTIVATIONS = {
  "silu": jax.nn.silu,
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "relu": jax.nn.relu,
}


def activation(name: str, default: str):
  """The activation function named by `model.mlp_activation` ("auto" = `default`)."""
  return ACTIVATIONS[default if name == "auto" else name]


class SwiGLU(nnx.Module):
  """down(act(gate(x)) * up(x)), act = silu by default (Shazeer, 2020).

  Args:
    dim: Model width.
    hidden: Hidden width.
    use_bias: Biases on gate, up and down (Llama's `mlp_bias`).
    act: The gate's activation.
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
    use_bias=False,
    act=jax.nn.silu,
    init_std=0.02,
    out_init_std=0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, use_bias=use_bias, rngs=rngs)
    self.act = act
    self.gate = Linear(dim, hidden, axes=("embed", "mlp"), init_std=init_std, **kw)
    self.up = Linear(dim, hidden, axes=("embed", "mlp"), init_std=init_std, **kw)
    self.down = Linear(hidden, dim, axes=("mlp", "embed"), init_std=out_init_std, **kw)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    gate, up = fused_linear(x_btd, (self.gate, self.up))
    return self.down(self.act(gate) * up)


class GeluMLP(nnx.Module):
  """down(act(up(x))) with biases, act = tanh-approximate gelu by default, as in GPT-2 and BERT.

  Arguments as in `SwiGLU` (always biased).
  """

  decode_inexact = None  # Position-wise: cached decoding equals the full forward.

  def __init__(
    self,
    dim,
    hidden,
    *,
    act=ACTIVATIONS["gelu_tanh"],
    init_std=0.02,
    out_init_std=0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = act
    self.up = Linear(dim, hidden, axes=("embed", "mlp"), use_bias=True, init_std=init_std, **kw)
    self.down = Linear(
      hidden, dim, axes=("mlp", "embed"), use_bias=True, init_std=out_init_std, **kw
    )

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    return self.down(self.act(self.up(x_btd)))


@MLPS.register("swiglu")
def _swiglu(cfg, *, rngs: nnx.Rngs) -> SwiGLU:
  act = activation(cfg.mlp_activation, "silu")
  return SwiGLU(cfg.d_model, cfg.mlp_dim, use_bias=cfg.mlp_bias, act=act, **layer_kwargs(cfg, rngs))


@MLPS.register("gelu")
def _gelu(cfg, *, rngs: nnx.Rngs) -> GeluMLP:
  act = activation(cfg.mlp_activation, "gelu_tanh")
  return GeluMLP(cfg.d_model, cfg.mlp_dim, act=act, **layer_kwargs(cfg, rngs))

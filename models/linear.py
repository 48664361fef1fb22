"""Projection layers with logical axis names.

Axes: the caller names the input and output axes (e.g. ("embed", "mlp")); a multi-axis output
such as ("heads", "head_dim") keeps one parameter axis per logical name.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.sharding import (
  column_parallel_gather,
  param,
  row_parallel_scatter,
  sequence_axis,
)


class Linear(nnx.Module):
  """y = x W (+ b) over the last axis of x, with W shaped [in, *out_shape].

  The matmul is done on x flattened to 2-D: XLA:CPU differentiates a rank-3 `dot_general`
  (contracting batch and sequence together for dW) several times slower than the same 2-D product.

  Args:
    in_features: Size of the input's last axis.
    out_shape: Output feature shape, e.g. (d_model,) or (num_heads, head_dim).
    axes: Logical names for the kernel, len(out_shape) + 1 of them.
    use_bias: Whether to add a bias (axes: the output names).
    init_std: Standard deviation of the normal kernel initialiser.
    dtype: Computation dtype (inputs and kernel are cast to it).
    param_dtype: Storage dtype of the parameters.
    rngs: Random streams; uses `rngs.params()`.
  """

  def __init__(
    self,
    in_features: int,
    out_shape: int | Sequence[int],
    *,
    axes: Sequence[str | None],
    use_bias: bool = False,
    init_std: float = 0.02,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    self.in_features = in_features
    self.dtype = dtype
    shape = (in_features, *self.out_shape)
    self.kernel = param(init_std * jax.random.normal(rngs.params(), shape, param_dtype), axes)
    self.bias = param(jnp.zeros(self.out_shape, param_dtype), tuple(axes)[1:]) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[:-1]
    n_out = math.prod(self.out_shape)
    w = self.kernel[...].astype(self.dtype).reshape(self.in_features, n_out)
    row, column = _sequence_parallel(self.kernel, x, 1)
    if row:  # Sequence parallel: reduce-scatter the partial products along the sequence.
      y = row_parallel_scatter(x.astype(self.dtype), w, row)
    elif column:  # Sequence parallel: gather the sequence inside the product.
      y = column_parallel_gather(x.astype(self.dtype), w, column)
    else:
      y = x.astype(self.dtype).reshape(-1, self.in_features) @ w  # [tokens, n_out]
    y = y.reshape(*lead, *self.out_shape)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class ProjectOut(nnx.Module):
  """y = x W (+ b) over several trailing input axes (e.g. heads and head_dim) to one output axis.

  Args:
    in_shape: Trailing input shape contracted away, e.g. (num_heads, head_dim).
    out_features: Output width.
    axes: Logical names for the kernel [*in_shape, out].
    use_bias: Whether to add a bias [out] (axes: the last name).
    init_std, dtype, param_dtype, rngs: As in `Linear`.
  """

  def __init__(
    self,
    in_shape: Sequence[int],
    out_features: int,
    *,
    axes: Sequence[str | None],
    use_bias: bool = False,
    init_std: float = 0.02,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.in_shape = tuple(in_shape)
    self.out_features = out_features
    self.dtype = dtype
    shape = (*self.in_shape, out_features)
    self.kernel = param(init_std * jax.random.normal(rngs.params(), shape, param_dtype), axes)
    self.bias = (
      param(jnp.zeros((out_features,), param_dtype), tuple(axes)[-1:]) if use_bias else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = math.prod(self.in_shape)
    lead = x.shape[: x.ndim - len(self.in_shape)]
    w = self.kernel[...].astype(self.dtype).reshape(n_in, self.out_features)
    row, _ = _sequence_parallel(self.kernel, x, len(self.in_shape))
    if row:  # Sequence parallel: reduce-scatter the partial products along the sequence.
      y = row_parallel_scatter(x.astype(self.dtype).reshape(*lead, n_in), w, row)
    else:
      y = x.astype(self.dtype).reshape(-1, n_in) @ w  # [tokens, out]
    y = y.reshape(*lead, self.out_features)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def _sequence_parallel(kernel: nnx.Param, x: jax.Array, num_in: int):
  """(row axis, column axis) of a [batch, seq, *in] input's product under sequence parallelism
  (`sharding.sequence_axis`): the kernel's first input name split over the row axis (reduce-scatter
  the output), or its first output name over the column axis (gather the input); None otherwise."""
  names = kernel.get_metadata().get("out_sharding") or ()
  if x.ndim != num_in + 2 or not names:
    return None, None
  names = tuple(names)[-kernel[...].ndim :]
  t, k = x.shape[1], math.prod(x.shape[2:])
  row = sequence_axis(names[0], t, k)
  column = None if row else sequence_axis(names[num_in], t, kernel[...].shape[num_in])
  return row, column


def fused_linear(x: jax.Array, layers: Sequence[Linear]) -> list[jax.Array]:
  """Applies several `Linear`s that share an input as fewer, wider matmuls (biases added after).

  Same result as `[layer(x) for layer in layers]`; one [tokens, L, N] product keeps the hardware
  busier than L narrow ones (e.g. q/k/v, or SwiGLU's gate and up). Layers of the same output shape
  are stacked on a new axis rather than concatenated: under tensor parallelism each kernel's output
  axis is sharded, and a stacked [in, L, N] kernel keeps that sharding on N, so every device
  computes its own slice of every output. (A concatenated [in, L*N] kernel is sharded across the
  joined axis instead, and splitting its output back costs collective permutes per layer.)
  Layers of different shapes (grouped-query q vs k/v) form separate groups. Parameters stay
  separate, each with its own logical axes. Layers that are not plain `Linear`s (e.g. compressed
  replacements with their own low-bit matmul) are applied one by one.
  """
  if any(type(layer) is not Linear for layer in layers):
    return [layer(x) for layer in layers]
  first = layers[0]
  if any(layer.in_features != first.in_features for layer in layers):
    raise ValueError("fused_linear needs layers with the same input width")
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, layer in enumerate(layers):
    groups.setdefault(layer.out_shape, []).append(i)
  lead = x.shape[:-1]
  x_tk = x.astype(first.dtype).reshape(-1, first.in_features)
  out: list[jax.Array | None] = [None] * len(layers)
  for out_shape, members in groups.items():
    if len(members) == 1:
      out[members[0]] = layers[members[0]](x)
      continue
    n = math.prod(out_shape)
    w_kln = jnp.stack(
      [layers[i].kernel[...].astype(first.dtype).reshape(first.in_features, n) for i in members],
      axis=1,
    )
    _, column = _sequence_parallel(layers[members[0]].kernel, x, 1)
    if column:  # Sequence parallel: gather the sequence inside the product.
      y_tln = column_parallel_gather(x.astype(first.dtype), w_kln, column).reshape(
        -1, *w_kln.shape[1:]
      )
    else:
      y_tln = jnp.einsum("tk,kln->tln", x_tk, w_kln)
    for j, i in enumerate(members):
      y = y_tln[:, j].reshape(*lead, *out_shape)
      bias = layers[i].bias
      out[i] = y if bias is None else y + bias[...].astype(first.dtype)
  return out

"""Parameter counts and sizes over pytrees of arrays or abstract shapes.

Works on concrete arrays, `jax.ShapeDtypeStruct` (e.g. from `jax.eval_shape` / `nnx.eval_shape`),
and `flax.nnx.State`, so a model's size can be reported without materialising its weights.
"""

import math
from typing import Any

import jax
import numpy as np


def _leaf_shape(leaf: Any) -> tuple[int, ...]:
  shape = getattr(leaf, "shape", None)
  if shape is None:
    # Python scalars and other array-likes without a `.shape`.
    shape = np.shape(leaf)
  return tuple(shape)


def _leaf_itemsize(leaf: Any) -> int:
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    dtype = np.asarray(leaf).dtype
  itemsize = getattr(dtype, "itemsize", None)
  if itemsize is None:
    itemsize = np.dtype(dtype).itemsize
  return int(itemsize)


def count_params(tree: Any) -> int:
  """Returns the total number of elements over all leaves of `tree`.

  Args:
    tree: A pytree whose leaves are arrays, `jax.ShapeDtypeStruct`s or scalars (for example
      `nnx.state(model, nnx.Param)` or its `jax.eval_shape` counterpart).

  Returns:
    The sum of `prod(leaf.shape)` over all leaves.
  """
  return sum(math.prod(_leaf_shape(leaf)) for leaf in jax.tree.leaves(tree))


def param_bytes(tree: Any) -> int:
  """Returns the total storage in bytes of all leaves of `tree` (elements × dtype itemsize).

  Args:
    tree: A pytree of arrays or `jax.ShapeDtypeStruct`s, as for `count_params`.

  Returns:
    The sum of `prod(leaf.shape) * leaf.dtype.itemsize` over all leaves.
  """
  return sum(math.prod(_leaf_shape(leaf)) * _leaf_itemsize(leaf) for leaf in jax.tree.leaves(tree))

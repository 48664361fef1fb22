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


def _key_name(entry: Any) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def _is_expert(path, leaf, expert_key: str) -> bool:
  # nnx.Variable leaves carry logical axes; pure dicts only have their path.
  get_metadata = getattr(leaf, "get_metadata", None)
  axes = get_metadata().get("out_sharding") if get_metadata is not None else None
  if axes:
    return "expert" in axes
  return any(_key_name(entry) == expert_key for entry in path)


def active_params(
  tree: Any,
  *,
  num_experts: int = 1,
  experts_per_token: float = 1.0,
  expert_key: str = "experts",
) -> int:
  """Parameters touched per token: non-expert parameters plus experts_per_token / num_experts of
  the expert parameters (e.g. top_k / num_experts for top-k routed mixtures of experts).

  Expert parameters are recognised by an `expert` logical axis in their metadata (an `nnx.State`
  of Variables) or, for pure dicts and shape trees, by a path component named `expert_key`. A
  router is not an expert parameter: every token uses it. Dropped tokens are not discounted.

  Args:
    tree: Parameters: an `nnx.State`, a pure nested dict, or their abstract shapes.
    num_experts: Experts per MoE layer.
    experts_per_token: Experts each token is processed by, on average.
    expert_key: Path component that marks expert parameters in trees without metadata.

  Returns:
    The rounded active-parameter count (the total when the tree has no expert parameters).
  """
  is_variable = lambda x: hasattr(x, "get_metadata")  # nnx.Variable, without importing flax
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
  dense = expert = 0
  for path, leaf in leaves:
    value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
    n = math.prod(_leaf_shape(value))
    if _is_expert(path, leaf, expert_key):
      expert += n
    else:
      dense += n
  return int(round(dense + expert * experts_per_token / num_experts))

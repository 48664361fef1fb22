"""Logical axis names and activation sharding constraints.

Every parameter carries logical axis names in its `out_sharding` metadata and major activations
are constrained by logical names. `parallel/` maps the names to mesh axes with
`flax.nnx.logical_axis_rules`; with no rules and no mesh active, constraints are no-ops, so layers
run unchanged on one device or in someone else's project.

Logical axes:
  batch, seq: activations' leading axes.
  embed: model width.  vocab: vocabulary.  mlp: MLP hidden width.
  heads, kv_heads, head_dim: attention projections.  layers: the stacked (scanned) layer axis.
"""

from collections.abc import Sequence

import jax
from flax import nnx
from flax.core import spmd as core_spmd

Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
  """Wraps an initialised array as a parameter tagged with logical axis names.

  Eager sharding is off: placement is decided by `parallel/` from the names, not at creation.
  """
  if len(axes) != value.ndim:
    raise ValueError(f"logical axes {tuple(axes)} do not match a parameter of shape {value.shape}")
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """Applies a sharding constraint by logical names when rules and a mesh are active."""
  rules = core_spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh is None or mesh.empty:
    return x
  spec = jax.sharding.PartitionSpec(*core_spmd.from_sharding_rules(axes, rules))
  return jax.lax.with_sharding_constraint(x, spec)

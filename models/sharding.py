"""Logical axis names and activation sharding constraints.

Every parameter carries logical axis names in its `out_sharding` metadata and major activations
are constrained by logical names. `parallel/` maps the names to mesh axes with
`flax.nnx.logical_axis_rules`; with no rules and no mesh active, constraints are no-ops, so layers
run unchanged on one device or in someone else's project.

Logical axes:
  batch, seq: activations' leading axes.
  residual_seq: the sequence axis of the residual stream between blocks (and so of the norms);
    split over `tensor` only under sequence parallelism, otherwise like `seq`.
  embed: model width.  vocab: vocabulary.  mlp: MLP hidden width.
  heads, kv_heads, head_dim: attention projections.  layers: the stacked (scanned) layer axis.
  expert: mixture-of-experts experts.  state: recurrent / state-space state width.
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


def logical_to_spec(
  axes: Axes,
  rules,
  shape: Sequence[int] | None = None,
  mesh_sizes: dict[str, int] | None = None,
  skip: frozenset[str] = frozenset(),
) -> jax.sharding.PartitionSpec:
  """Maps logical axis names to a PartitionSpec through a rules table.

  A mesh axis is used at most once per array: a later dimension that maps to an axis already
  taken stays unsharded on it (so activations [batch, seq, embed] under FSDP rules, where batch
  and embed both map to `fsdp`, keep only the batch split). With `shape` and `mesh_sizes`, an
  axis that does not divide its dimension is dropped rather than producing an invalid spec.

  Args:
    axes: Logical names, one per dimension (None = unsharded).
    rules: Pairs (logical name, mesh axis | tuple of mesh axes | None); names not in the table
      stay unsharded.
    shape: The array's shape, to check divisibility.
    mesh_sizes: Mesh axis name -> size.
    skip: Mesh axes never to use (e.g. manual axes inside `shard_map`).

  Returns:
    The PartitionSpec.
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for dim, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    target = (target,) if isinstance(target, str) else tuple(target or ())
    keep, size = [], 1
    for axis in target:
      if axis in used or axis in skip:
        continue
      n = mesh_sizes.get(axis, 1) if mesh_sizes is not None else 1
      if shape is not None and shape[dim] % (size * n):
        continue
      keep.append(axis)
      size *= n
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  while out and out[-1] is None:
    out.pop()
  return jax.sharding.PartitionSpec(*out)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """Applies a sharding constraint by logical names when rules and a mesh are active.

  Mesh axes that are manual (inside `shard_map`) or that do not divide a dimension are left out.
  """
  rules = core_spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(axes, rules, x.shape, dict(mesh.shape), skip=frozenset(mesh.manual_axes))
  return jax.lax.with_sharding_constraint(x, spec)

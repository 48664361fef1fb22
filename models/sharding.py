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
import jax.numpy as jnp
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


# Pallas kernels under a mesh -------------------------------------------------------------------
#
# XLA cannot partition a Mosaic (Pallas TPU) kernel: inside a program partitioned over a mesh,
# every kernel call must sit in a `shard_map` whose manual axes are *all* the mesh's axes (size-1
# axes included), each device calling the kernel on its own shard. These helpers pick, from the
# active logical-axis rules, which mesh axes split each operand dimension, and run the call.


def kernel_mesh() -> tuple[jax.sharding.AbstractMesh, tuple[str, ...]] | None:
  """(active mesh, its non-manual axes) when a kernel call must run per device shard, else None.

  None when there is no mesh, when every axis is manual already, or when every axis has size 1
  (nothing is partitioned: a kernel can be called directly). Inside a `shard_map` over some axes
  (a pipeline stage, say) the remaining ones are returned even if all have size 1: the per-device
  call then also leaves that `shard_map`'s replication checks, which opaque kernels cannot meet.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  free = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
  if not free or not (mesh.manual_axes or any(mesh.shape[a] > 1 for a in free)):
    return None
  return mesh, free


def kernel_split(
  name: str | None, *dims: int, taken: Sequence[str] = (), mesh=None
) -> tuple[str, ...]:
  """Mesh axes that split logical axis `name` in a per-device kernel call.

  The axes the active rules map `name` to, restricted to non-manual axes of size > 1 not in
  `taken`; () unless their product divides every one of `dims` (then the dimension stays whole).
  """
  mesh = mesh or jax.sharding.get_abstract_mesh()
  rules = dict(core_spmd.get_logical_axis_rules() or ())
  target = rules.get(name) if name is not None else None
  target = (target,) if isinstance(target, str) else tuple(target or ())
  target = tuple(
    a for a in target if a not in mesh.manual_axes and mesh.shape[a] > 1 and a not in taken
  )
  size = 1
  for a in target:
    size *= mesh.shape[a]
  return target if target and not any(d % size for d in dims) else ()


def spec_entry(axes: Sequence[str]) -> str | tuple[str, ...] | None:
  """A PartitionSpec entry for a dimension split over `axes` (None if unsplit)."""
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def nested_partitioned() -> bool:
  """Whether a kernel call here would be a `shard_map` nested in another one (a pipeline stage)
  with an automatic axis of size > 1 left: there it can run forward only (see `per_device`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not mesh.manual_axes:
    return False
  return any(mesh.shape[a] > 1 for a in mesh.axis_names if a not in mesh.manual_axes)


def per_device(fn, free: Sequence[str], in_specs, out_specs, *, mesh=None):
  """`fn` run by every device on its shards: `jax.shard_map` with all of `free` manual.

  Axes in `free` that no spec names see replicated operands (every device along them computes
  the same result). At the top level replication checks (`check_vma`) are off: a kernel's output
  types cannot say how they vary. Inside another `shard_map` (a pipeline stage) they stay on, as
  the outer one's types already carry them (the kernels type their outputs, see
  `kernels_pallas.base.pallas_call`); there the call runs forward only: jax 0.12 cannot lower the
  gradient of a `shard_map` nested in another ("operates on axis ... already bound by a parent
  manual_computation", even for jnp.sin), so differentiating it is a one-line error at trace time.
  """
  mesh = mesh or jax.sharding.get_abstract_mesh()
  nested = bool(mesh.manual_axes)
  call = jax.shard_map(
    fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=set(free), check_vma=nested
  )
  if not nested:
    return call
  outer = sorted(mesh.manual_axes)
  auto = sorted(a for a in free if mesh.shape[a] > 1)

  @jax.custom_vjp
  def forward_only(*args):
    return call(*args)

  def bwd(*_):
    raise ValueError(
      f"a Pallas kernel inside a shard_map over {outer} with automatic mesh axes {auto} of size "
      "> 1 cannot be differentiated (jax 0.12 does not lower the gradient of a nested shard_map); "
      "use implementation='auto' there (XLA code) or a preset whose other axes are size 1"
    )

  forward_only.defvjp(lambda *args: (call(*args), None), bwd)
  return forward_only


# Sequence parallelism: row-parallel projections that reduce-scatter ---------------------------


def sequence_parallel() -> bool:
  """Whether the active rules split the residual stream's sequence (`residual_seq`)."""
  return bool(dict(core_spmd.get_logical_axis_rules() or ()).get("residual_seq"))


def sequence_axis(name: str | None, seq_len: int, features: int) -> str | None:
  """The mesh axis that splits both the residual stream's sequence (`residual_seq`: mapped only
  under `parallel.sequence_parallel`) and a projection's features named `name` ("mlp", "heads"
  over `tensor`), when it divides the sequence and the features and is not manual; else None.

  A projection whose input features are split over that axis is row-parallel (its product is a
  partial sum per device: `row_parallel_scatter`), one whose output features are split over it is
  column-parallel (it needs the whole sequence: `column_parallel_gather`).
  """
  rules = dict(core_spmd.get_logical_axis_rules() or ())
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh is None or mesh.empty or name is None:
    return None
  as_tuple = lambda t: (t,) if isinstance(t, str) else tuple(t or ())
  common = set(as_tuple(rules.get("residual_seq"))) & set(as_tuple(rules.get(name)))
  for axis in sorted(common):
    n = mesh.shape[axis]
    if axis not in mesh.manual_axes and n > 1 and not seq_len % n and not features % n:
      return axis
  return None


def _sequence_map(local, axis: str, x: jax.Array, w: jax.Array, x_spec, w_spec, out_spec):
  """local(x, w) per device: `axis` and the batch axes manual (every other axis too: a partly
  automatic shard_map left the batch unsplit inside and gathered it over the data axes)."""
  mesh = jax.sharding.get_abstract_mesh()
  free = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
  batch = spec_entry(kernel_split("batch", x.shape[0], taken=(axis,), mesh=mesh))
  P = jax.sharding.PartitionSpec
  call = per_device(local, free, (P(batch, *x_spec), P(*w_spec)), P(batch, *out_spec), mesh=mesh)
  return call(x, w)


def row_parallel_scatter(x_btk: jax.Array, w_kn: jax.Array, axis: str) -> jax.Array:
  """[b, t, K] x [K, N] -> [b, t, N] with K split over `axis` and the output's t split over it.

  Each device multiplies its K slice (a partial sum of the whole product) and one
  `psum_scatter` sums the partials and leaves each device its sequence slice: Megatron's
  reduce-scatter, where sharding constraints alone had XLA all-reduce the whole sequence and
  re-split it. Its transpose (the backward pass) is the matching all-gather.
  """

  def local(x_btk, w_kn):
    y = jnp.einsum("btk,kn->btn", x_btk, w_kn)
    return jax.lax.psum_scatter(y, axis, scatter_dimension=1, tiled=True)

  return _sequence_map(local, axis, x_btk, w_kn, (None, axis), (axis, None), (axis, None))


def column_parallel_gather(x_btd: jax.Array, w: jax.Array, axis: str) -> jax.Array:
  """[b, t, d] with t split over `axis`, times w [d, ..., N] with N split over it:
  [b, t, ..., N], the whole sequence, N split.

  One all-gather of the sequence inside the shard_map, so that its transpose in the backward
  pass is one reduce-scatter of the input gradient (each device's is a partial sum over its N
  slice): Megatron's pair, where sharding constraints alone had XLA all-reduce it.
  """
  rest = (None,) * (w.ndim - 2)

  def local(x_btd, w):
    return jnp.tensordot(jax.lax.all_gather(x_btd, axis, axis=1, tiled=True), w, axes=1)

  return _sequence_map(
    local, axis, x_btd, w, (axis, None), (None, *rest, axis), (None, *rest, axis)
  )

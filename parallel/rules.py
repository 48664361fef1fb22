"""Logical-axis rules: which mesh axes each logical axis name is split over, one preset per strategy.

Every parameter carries logical names in its `out_sharding` metadata (stacked layer parameters
lead with `layers`), and activations are constrained by logical names (`models.sharding`). A
rules table maps those names to mesh axes. Each mesh axis has one role:

  data      batch                                  (data parallel: parameters replicated)
  fsdp      batch; parameters' `embed` dimension   (FSDP / ZeRO-3: params, grads, optimizer
                                                    state sharded, gathered where used)
  tensor    heads, kv_heads, mlp, vocab            (Megatron: column- then row-parallel MLP,
                                                    heads split in attention)
  pipeline  layers                                 (pipeline stages own contiguous layers)
  expert    expert; batch                          (expert parallel; the expert axis is also a
                                                    data-parallel axis for everything else)

Sequence parallelism (`parallel.sequence_parallel=True`, with tensor > 1; Korthikanti et al.
2022) also splits `residual_seq` over `tensor`: the residual stream and the norms between the
tensor-parallel regions hold 1/t of the sequence (their activations and work divided by t). In
Megatron each block-output all-reduce becomes a reduce-scatter plus an all-gather; from these
constraints alone XLA's partitioner currently all-reduces and then re-splits with an all-to-all
(more bytes; see experiments/benchmarks/parallel.py). A sequence length not divisible by `tensor`
leaves the residual unsplit.

A preset names the mesh axes a strategy uses; its table is the union of their roles. Mesh axes of
size > 1 outside the preset are an error (their devices would only repeat work). "auto" uses every
axis whose size is > 1. A mesh axis is used at most once per array (see
`models.sharding.logical_to_spec`), so `[batch, seq, embed]` activations under FSDP keep only the
batch split, while `[embed, mlp]` weights are split on `embed`.
"""

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from reslm.models.sharding import logical_to_spec
from reslm.parallel import pipeline
from reslm.parallel.mesh import AXES

LOGICAL_AXES = (
  "batch",
  "seq",
  "residual_seq",
  "embed",
  "heads",
  "kv_heads",
  "head_dim",
  "mlp",
  "vocab",
  "expert",
  "layers",
  "state",
)
# Logical names each mesh axis splits when it is part of a strategy.
ROLES: dict[str, tuple[str, ...]] = {
  "data": ("batch",),
  "fsdp": ("batch", "embed"),
  "tensor": ("heads", "kv_heads", "mlp", "vocab"),
  "pipeline": ("layers",),
  "expert": ("expert", "batch"),
}
# fmt: off
PRESETS: dict[str, tuple[str, ...]] = {
  "dp": ("data",),
  "fsdp": ("data", "fsdp"),          # data > 1 too: hybrid (replicate over data, shard over fsdp)
  "tp": ("tensor",),
  "dp_tp": ("data", "tensor"),
  "fsdp_tp": ("data", "fsdp", "tensor"),
  "pp": ("pipeline",),
  "dp_pp": ("data", "pipeline"),
  "fsdp_pp": ("data", "fsdp", "pipeline"),
  "ep": ("expert",),
  "dp_ep": ("data", "expert"),
  "fsdp_ep": ("data", "fsdp", "expert"),
  "tp_ep": ("tensor", "expert"),
}
# fmt: on
AUTO = "auto"
EXPERT_DISPATCHES = ("all_to_all", "spmd")
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def preset_axes(name: str, sizes: Mapping[str, int] | None = None) -> tuple[str, ...]:
  """The mesh axes a preset uses ("auto": those of size > 1, needing `sizes`)."""
  if name == AUTO:
    if sizes is None:
      raise ValueError("parallel.rules='auto' needs the mesh sizes to pick its axes")
    return tuple(a for a in AXES if sizes.get(a, 1) > 1)
  if name not in PRESETS:
    raise ValueError(
      f"parallel.rules={name!r} is not a preset; choose one of: {', '.join([AUTO, *PRESETS])}"
    )
  return PRESETS[name]


def make_rules(axes: tuple[str, ...], *, sequence_parallel: bool = False) -> Rules:
  """The rules table of a strategy using mesh `axes`: every logical name, in LOGICAL_AXES order.

  A name split over several mesh axes lists them in mesh order (data, fsdp, ..., expert).
  `sequence_parallel` adds `residual_seq` to the roles of `tensor` (when `axes` has it).
  """
  roles = dict(ROLES)
  if sequence_parallel:
    roles["tensor"] = (*roles["tensor"], "residual_seq")
  table = []
  for name in LOGICAL_AXES:
    mesh_axes = tuple(a for a in AXES if a in axes and name in roles[a])
    table.append(
      (name, None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    )
  return tuple(table)


def get_rules(
  name: str, sizes: Mapping[str, int] | None = None, *, sequence_parallel: bool = False
) -> Rules:
  """The rules table of preset `name` (for "auto", of the mesh axes of size > 1 in `sizes`)."""
  return make_rules(preset_axes(name, sizes), sequence_parallel=sequence_parallel)


def batch_axes(rules: Rules) -> tuple[str, ...]:
  """Mesh axes the batch is split over."""
  target = dict(rules).get("batch")
  return (target,) if isinstance(target, str) else tuple(target or ())


def _num_experts(model_cfg) -> int | None:
  if "moe" not in getattr(model_cfg, "mlp_pattern", ()):
    return None
  from reslm.models import moe  # Lazily: only MoE models need it.

  return moe.moe_options(model_cfg)["num_experts"]


def validate(parallel_cfg, model_cfg, sizes: Mapping[str, int]) -> Rules:
  """Checks that the preset and the model fit the mesh; returns the rules table.

  Args:
    parallel_cfg: The `parallel` section.
    model_cfg: A `models.config.ModelConfig`.
    sizes: Resolved mesh sizes (`parallel.mesh.mesh_shape`).

  Raises:
    ValueError: One line naming the setting, its value and what is allowed.
  """
  name = parallel_cfg.get("rules", AUTO)
  axes = preset_axes(name, sizes)
  for axis in AXES:
    if sizes[axis] > 1 and axis not in axes:
      users = [p for p, used in PRESETS.items() if axis in used]
      raise ValueError(
        f"parallel.{axis}={sizes[axis]} but parallel.rules={name!r} does not use the {axis} axis; "
        f"use a preset that does ({', '.join(users)}) or 'auto'"
      )
  sequence_parallel = parallel_cfg.get("sequence_parallel", False)
  if not isinstance(sequence_parallel, bool):
    raise ValueError(f"parallel.sequence_parallel={sequence_parallel!r} must be True or False")
  warn_mb = parallel_cfg.get("warn_replicated_mb", 0.0)
  if warn_mb < 0:
    raise ValueError(f"parallel.warn_replicated_mb={warn_mb} must be >= 0 (0 disables the check)")

  def divides(setting: str, value: int, axis: str) -> None:
    if value % sizes[axis]:
      raise ValueError(
        f"{setting}={value} is not divisible by parallel.{axis}={sizes[axis]}; use a "
        f"{axis} size that divides it ({', '.join(str(d) for d in _divisors(value))})"
      )

  if sizes["tensor"] > 1:
    divides("model.num_heads", model_cfg.num_heads, "tensor")
    divides("model.num_kv_heads", model_cfg.num_kv_heads, "tensor")
    divides("model.mlp_dim", model_cfg.mlp_dim, "tensor")
  if sizes["fsdp"] > 1:
    divides("model.d_model", model_cfg.d_model, "fsdp")
  if sizes["pipeline"] > 1:
    try:
      pipeline.check(
        model_cfg.num_layers // model_cfg.group_size,
        sizes["pipeline"],
        pipeline_microbatches(parallel_cfg, sizes),
        None,
        parallel_cfg.get("pipeline_schedule", "gpipe"),
        parallel_cfg.get("pipeline_repeats", 1),
      )
    except ValueError as e:
      if "layer groups" not in str(e):
        raise
      raise ValueError(f"model.num_layers={model_cfg.num_layers}: {e}") from None
  dispatch = parallel_cfg.get("expert_dispatch", "all_to_all")
  if dispatch not in EXPERT_DISPATCHES:
    raise ValueError(
      f"parallel.expert_dispatch={dispatch!r} is not known; choose one of: "
      f"{', '.join(EXPERT_DISPATCHES)}"
    )
  if sizes["expert"] > 1:
    experts = _num_experts(model_cfg)
    if experts is None:
      raise ValueError(
        f"parallel.expert={sizes['expert']} needs a mixture-of-experts model (model.mlp='moe'), "
        f"got model.mlp={model_cfg.mlp!r}"
      )
    divides("model.mlp_options.num_experts", experts, "expert")
  return make_rules(axes, sequence_parallel=sequence_parallel)


def pipeline_microbatches(parallel_cfg, sizes: Mapping[str, int]) -> int:
  """Microbatches of the pipeline schedule (0 in the config: one per stage)."""
  return parallel_cfg.get("pipeline_microbatches", 0) or sizes["pipeline"]


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


# Parameters ------------------------------------------------------------------------------------


def logical_axes(model_state: nnx.State) -> dict[tuple, tuple[str | None, ...]]:
  """Each parameter's logical axis names (its `out_sharding` metadata), by state path.

  A parameter without names gets all-None names (it stays replicated).
  """
  out = {}
  for path, v in nnx.to_flat_state(model_state):
    names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
    out[tuple(path)] = tuple(names) if names else (None,) * len(v.shape)
  return out


def _keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def param_specs(logical: dict, abstract_params, rules: Rules, mesh_sizes: Mapping[str, int]):
  """PartitionSpecs for every parameter of a pure-dict params tree.

  Args:
    logical: `logical_axes` of the model's state.
    abstract_params: The params pytree (arrays or ShapeDtypeStructs), `State.to_pure_dict()`
      layout.
    rules: A rules table.
    mesh_sizes: Mesh axis sizes (a mesh axis that does not divide a dimension is not used).

  Returns:
    A pytree like `abstract_params` with a PartitionSpec per leaf.
  """
  sizes = dict(mesh_sizes)

  def spec(path, leaf):
    names = logical.get(_keys(path), (None,) * len(leaf.shape))
    return logical_to_spec(names, rules, leaf.shape, sizes)

  return jax.tree_util.tree_map_with_path(spec, abstract_params)


def with_rules(fn, mesh: Mesh, rules: Rules):
  """Wraps `fn` so that, when traced, activation constraints (`models.sharding.constrain`) see
  `rules` and `mesh`; pass the result to `jax.jit`."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(rules):
      return fn(*args, **kwargs)

  return wrapped


def _is_spec(x) -> bool:
  return isinstance(x, P)


HOST_MEMORY = "pinned_host"


def check_offload(mesh: Mesh) -> None:
  """Raises a one-line ValueError unless the mesh's devices have host memory to offload to."""
  device = mesh.devices.flat[0]
  kinds = [m.kind for m in device.addressable_memories()]
  if HOST_MEMORY not in kinds:
    raise ValueError(
      f"parallel.offload_opt_state=True needs a {HOST_MEMORY!r} memory kind, which the "
      f"{device.platform} backend does not offer (it has: {', '.join(kinds)}); set it to False"
    )


def state_shardings(
  abstract_state,
  specs: dict,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  *,
  offload_opt_state: bool = False,
):
  """NamedShardings for a whole `TrainState`: params by `specs`, optimizer state mirroring them.

  Optimizer leaves that mirror a parameter (Adam's mu and nu) take that parameter's sharding
  (in host memory with `offload_opt_state`); everything else (step counters, scalars) is
  replicated on the devices.
  """
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
  replicated = NamedSharding(mesh, P())
  kind = HOST_MEMORY if offload_opt_state else None
  opt_sh = optax.tree_utils.tree_map_params(
    tx,
    lambda _, sharding: sharding.with_memory_kind(kind) if kind else sharding,
    abstract_state.opt_state,
    param_sh,
    transform_non_params=lambda _: replicated,
  )
  return abstract_state.replace(
    step=replicated,
    params=param_sh,
    opt_state=opt_sh,
    first_nonfinite_step=replicated,
    nonfinite_count=replicated,
  )


def bytes_per_device(tree, shardings) -> int:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) placed by `shardings`."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
    shard = sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def replicated_params(abstract_params, specs: dict, min_bytes: float) -> list[tuple[str, int]]:
  """Parameters of at least `min_bytes` that no mesh axis splits: [(path, bytes)], largest first."""
  found = []
  flat_specs = dict(jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    if nbytes >= min_bytes and not any(flat_specs[path]):
      found.append(("/".join(str(getattr(k, "key", k)) for k in path), nbytes))
  return sorted(found, key=lambda item: -item[1])


def check_replicated(abstract_params, specs: dict, rules: Rules, warn_mb: float) -> list:
  """Logs (and returns) the large parameters a parameter-sharding strategy left replicated.

  Pure data parallelism replicates every parameter by design, so nothing is reported there.
  """
  shards_params = any(
    target is not None for name, target in rules if name not in ("batch", "seq", "residual_seq")
  )
  if not warn_mb or not shards_params:
    return []
  found = replicated_params(abstract_params, specs, warn_mb * 2**20)
  if found:
    listed = ", ".join(f"{path} ({nbytes / 2**20:.1f} MiB)" for path, nbytes in found[:5])
    logging.warning(
      "%d parameter(s) >= %g MiB are replicated on every device (parallel.warn_replicated_mb): %s",
      len(found),
      warn_mb,
      listed,
    )
  return found


def describe(specs: dict) -> dict[str, str]:
  """Path -> PartitionSpec text, for logs and golden tables."""
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): str(spec) for path, spec in flat}


def placement_summary(state, shardings) -> dict[str, Any]:
  """Per-device bytes of parameters and optimizer state under `shardings`."""
  return {
    "params_bytes_per_device": bytes_per_device(state.params, shardings.params),
    "opt_state_bytes_per_device": bytes_per_device(state.opt_state, shardings.opt_state),
  }

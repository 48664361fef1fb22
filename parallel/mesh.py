"""A named device mesh from the `parallel` config section.

Axes (outermost first): data, fsdp, tensor, pipeline, expert. A size of -1 means "all remaining
devices"; at most one axis may use it. Which logical axes each mesh axis splits (and so how the
batch is split) is chosen by the `parallel.rules` preset (`parallel.rules`).
"""

import contextlib
import math

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor", "pipeline", "expert")


def get_default_config() -> ml_collections.ConfigDict:
  """Defaults for the `parallel` section: pure data parallelism over every device.

  Fields besides the axis sizes:
    rules: Logical-axis rules preset (`parallel.rules.PRESETS`), or "auto" for the roles of every
      axis of size > 1.
    warn_replicated_mb: Warn about parameters at least this large left replicated by a
      parameter-sharding strategy (0 disables).
    pipeline_microbatches: Microbatches per step when pipeline > 1 (0: as many as stages).
    pipeline_schedule: "gpipe" or "circular" (interleaved stages, smaller bubble).
    pipeline_repeats: Laps of the circular schedule (layer chunks per device).
    expert_dispatch: With expert > 1: "all_to_all" (parallel.experts: tokens exchanged by
      all-to-all, capacity per expert-parallel group) or "spmd" (the model's own dispatch,
      partitioned by XLA from the rules).
    sequence_parallel: With tensor > 1, also split the residual stream and norms along the
      sequence over `tensor` (Megatron sequence parallelism; see `parallel.rules`).
    offload_opt_state: Keep the optimizer state in host memory ("pinned_host" memory kind)
      between steps, where the backend has it.
  """
  return ml_collections.ConfigDict(
    {
      "data": -1,
      "fsdp": 1,
      "tensor": 1,
      "pipeline": 1,
      "expert": 1,
      "rules": "auto",
      "warn_replicated_mb": 4.0,
      "pipeline_microbatches": 0,
      "pipeline_schedule": "gpipe",
      "pipeline_repeats": 2,
      "expert_dispatch": "all_to_all",
      "sequence_parallel": False,
      "offload_opt_state": False,
    }
  )


# Settings of the `parallel` section that are not mesh axes.
SETTINGS = (
  "rules",
  "warn_replicated_mb",
  "pipeline_microbatches",
  "pipeline_schedule",
  "pipeline_repeats",
  "expert_dispatch",
  "sequence_parallel",
  "offload_opt_state",
)


def mesh_shape(cfg, num_devices: int) -> dict[str, int]:
  """Resolves -1 and checks the product against the device count.

  Args:
    cfg: The `parallel` config section (a mapping from axis name to size).
    num_devices: Devices available.

  Returns:
    Axis name -> size, in `AXES` order.

  Raises:
    ValueError: On unknown axes, bad sizes or a product that is not the device count.
  """
  sizes = {axis: int(cfg.get(axis, 1)) for axis in AXES}
  unknown = sorted(set(cfg.keys()) - set(AXES) - set(SETTINGS))
  if unknown:
    raise ValueError(
      f"parallel.{unknown[0]} is not a parallel setting; choose from: {', '.join(AXES + SETTINGS)}"
    )
  auto = [axis for axis, n in sizes.items() if n == -1]
  for axis, n in sizes.items():
    if n == 0 or n < -1:
      raise ValueError(f"parallel.{axis}={n} must be a positive size or -1 (all remaining devices)")
  if len(auto) > 1:
    raise ValueError(
      f"only one mesh axis may be -1; got {', '.join('parallel.' + a for a in auto)}"
    )
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if auto:
    if num_devices % fixed:
      raise ValueError(
        f"the fixed mesh axes multiply to {fixed}, which does not divide the {num_devices} devices"
      )
    sizes[auto[0]] = num_devices // fixed
  elif fixed != num_devices:
    shape = " x ".join(f"{a}={n}" for a, n in sizes.items() if n != 1) or "1"
    raise ValueError(f"mesh {shape} has {fixed} devices but {num_devices} are available")
  return sizes


def make_mesh(cfg, devices=None) -> Mesh:
  """Builds the mesh over `devices` (default: all devices) from the `parallel` config."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(cfg, len(devices))
  shape = tuple(sizes.values())
  grid = np.asarray(devices).reshape(shape)
  if devices[0].platform == "tpu":
    # Neighbouring mesh coordinates on neighbouring chips of the torus.
    from jax.experimental import mesh_utils

    # Shapes the helper cannot map keep the plain device order.
    with contextlib.suppress(ValueError, NotImplementedError, AssertionError):
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(grid, tuple(sizes))

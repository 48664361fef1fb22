"""A named device mesh from the `parallel` config section.

Axes (outermost first): data, fsdp, tensor, pipeline, expert. A size of -1 means "all remaining
devices"; at most one axis may use it. The batch is split over data (and fsdp) axes.
"""

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor", "pipeline", "expert")


def get_default_config() -> ml_collections.ConfigDict:
  """Defaults for the `parallel` section: pure data parallelism over every device."""
  return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "pipeline": 1, "expert": 1})


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
  unknown = sorted(set(cfg.keys()) - set(AXES))
  if unknown:
    raise ValueError(f"parallel.{unknown[0]} is not a mesh axis; choose from: {', '.join(AXES)}")
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
  return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), tuple(sizes))


def batch_axes() -> tuple[str, ...]:
  """Mesh axes the batch dimension is split over."""
  return ("data", "fsdp")

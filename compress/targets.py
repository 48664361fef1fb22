"""What rules can select: the model's projections and attention mixers, named by module path.

Paths are the module's `nnx` graph path joined by "/", e.g. for a `DecoderLM`:

  layers/groups/blocks/0/mixer/q      attention query projection (Linear)
  layers/groups/blocks/0/mixer/o      attention output projection (ProjectOut)
  layers/groups/blocks/0/mlp/up       MLP projections (gate, up, down)
  layers/groups/blocks/0/mixer        the attention mixer itself (for KV-cache options)
  lm_head                             untied output projection (absent with tied embeddings)

Layers: a `LayerStack` holds every block group's parameters stacked on a leading `layers` axis,
so one path names one block position in the group for all groups at once:
`layers/groups/blocks/{i}/...` holds model layers i, i + S, i + 2S, ... (S = blocks per group,
1 for a homogeneous model, so blocks/0 holds every layer). A rule selects the whole stacked
module; per-layer methods run on each layer's slice with that layer's own calibration inputs, and
reports name a slice `<path>[layer=L]`. Embedding tables are not projections and are never
selected.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.compress.layers import CompressedLinear
from reslm.models.attention.base import Attention
from reslm.models.linear import Linear, ProjectOut


@dataclasses.dataclass
class Target:
  """One selectable module.

  Attributes:
    path: The nnx graph path (tuple of attribute names and list indices).
    name: The path joined by "/".
    kind: "linear" or "attention".
    module: The module itself.
    lead: Stacked leading axes of its parameters: () or (num_groups,).
    layers: Model layer index of each stacked slice (empty when not stacked).
    in_shape, out_shape: Contracted input axes and output axes (projections only).
    in_axis, out_axis: First logical axis name of the input and of the output.
  """

  path: tuple
  name: str
  kind: str
  module: nnx.Module
  lead: tuple[int, ...] = ()
  layers: tuple[int, ...] = ()
  in_shape: tuple[int, ...] = ()
  out_shape: tuple[int, ...] = ()
  in_axis: str | None = None
  out_axis: str | None = None

  @property
  def num_slices(self) -> int:
    return math.prod(self.lead)

  def slice_name(self, i: int) -> str:
    return f"{self.name}[layer={self.layers[i]}]" if self.layers else self.name

  def weights(self) -> jax.Array:
    """float32 [slices, K, N]: each layer's kernel flattened to (inputs, outputs)."""
    k, n = math.prod(self.in_shape), math.prod(self.out_shape)
    return self.module.kernel[...].astype(jnp.float32).reshape(self.num_slices, k, n)

  def bias(self) -> nnx.Param | None:
    return getattr(self.module, "bias", None)


def path_name(path) -> str:
  return "/".join(str(p) for p in path)


def get_module(root: nnx.Module, path) -> Any:
  node = root
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def set_module(root: nnx.Module, path, new: Any) -> None:
  """Replaces the module at `path` (module surgery; the graph definition changes with it)."""
  parent = get_module(root, path[:-1])
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def install(root: nnx.Module, target: "Target", cls: type, arrays: dict, **static) -> Any:
  """Builds `cls` (a `CompressedLinear`) in `target`'s place from per-layer-stacked `arrays`
  (leading axis dropped for an unstacked projection) and installs it; returns the new module."""
  if not target.lead:
    arrays = {key: value[0] for key, value in arrays.items()}
  new = cls(
    arrays,
    in_shape=target.in_shape,
    out_shape=target.out_shape,
    in_axis=target.in_axis,
    out_axis=target.out_axis,
    lead=target.lead,
    dtype=target.module.dtype,
    bias=target.bias(),
    **static,
  )
  set_module(root, target.path, new)
  return new


def _stack_layers(root, path, lead) -> tuple[int, ...]:
  if not lead:
    return ()
  (groups,) = lead
  # A LayerStack path: .../groups/blocks/{i}/... with S blocks per group.
  for j in range(len(path) - 1):
    if path[j] == "blocks" and isinstance(path[j + 1], int):
      size = len(get_module(root, path[: j + 1]))
      return tuple(g * size + path[j + 1] for g in range(groups))
  return tuple(range(groups))


def _projection(root, path, module) -> Target:
  axes = module.kernel.get_metadata().get("out_sharding") or ()
  if isinstance(module, Linear):
    in_shape, out_shape = (module.in_features,), module.out_shape
    lead_n = module.kernel.ndim - 1 - len(out_shape)
    names = tuple(axes[lead_n:]) if axes else (None, None)
    in_axis, out_axis = names[0], names[1] if len(names) > 1 else None
  else:
    in_shape, out_shape = module.in_shape, (module.out_features,)
    lead_n = module.kernel.ndim - len(in_shape) - 1
    names = tuple(axes[lead_n:]) if axes else (None,)
    in_axis, out_axis = names[0], names[-1]
  lead = tuple(module.kernel.shape[:lead_n])
  return Target(
    path=tuple(path),
    name=path_name(path),
    kind="linear",
    module=module,
    lead=lead,
    layers=_stack_layers(root, path, lead),
    in_shape=tuple(in_shape),
    out_shape=tuple(out_shape),
    in_axis=in_axis,
    out_axis=out_axis,
  )


def target_at(model: nnx.Module, path) -> Target:
  """The projection at `path` as it is now (a previous stage may have changed it)."""
  node = get_module(model, path)
  if not isinstance(node, Linear | ProjectOut):
    raise ValueError(f"{path_name(path)} is no longer a float projection ({type(node).__name__})")
  return _projection(model, path, node)


def find_targets(model: nnx.Module) -> list[Target]:
  """Every float projection (`Linear`, `ProjectOut`) and attention mixer, in graph order.

  Already compressed projections are not targets (compress a float model).
  """
  out = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Linear | ProjectOut):
      out.append(_projection(model, path, node))
    elif isinstance(node, Attention):
      stacked = _first_lead(node)
      out.append(
        Target(
          path=tuple(path),
          name=path_name(path),
          kind="attention",
          module=node,
          lead=stacked,
          layers=_stack_layers(model, path, stacked),
        )
      )
  return out


def _first_lead(attn: Attention) -> tuple[int, ...]:
  if isinstance(attn.q, CompressedLinear):
    return attn.q.lead
  kernel = attn.q.kernel
  return tuple(kernel.shape[: kernel.ndim - 3])  # q kernel: [*lead, embed, heads, head_dim]

"""How a parameter is laid out in a Hugging Face checkpoint (`Source`), and the helpers the
family tables build them with: torch `nn.Linear` weights are [out, in] (ours: [in, *out]), head
projections are flat over heads x head_dim (ours: split), biases likewise.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from reslm.models.config import ModelConfig

# Hugging Face activation names -> `model.mlp_activation` (gelu_new = the tanh approximation).
HF_ACTIVATIONS = {
  "silu": "silu",
  "swish": "silu",
  "gelu": "gelu",
  "gelu_new": "gelu_tanh",
  "gelu_pytorch_tanh": "gelu_tanh",
  "relu": "relu",
}
Path = tuple  # A parameter's path in the model's pure-dict state, e.g. ("embed", "embedding").
BLOCK = ("layers", "groups", "blocks", 0)  # One block per group: every layer is in blocks/0.


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one parameter (one layer of it, when stacked) lives in a checkpoint.

  Our per-layer array = the HF tensor, restricted to `select` (dim, start, stop) if given,
  reshaped to `view`, transposed by `perm`.

  Attributes:
    name: The canonical HF tensor name; "{}" is the layer index when `stacked`.
    hf_shape: The HF tensor's full shape.
    view: The selected part reshaped (our axes, before the transpose).
    perm: Our axis j is view axis perm[j].
    select: Optional (HF dim, start, stop): the part of a fused tensor (GPT-2's q/k/v).
    stacked: Our array has a leading layers axis, layer l from name.format(l).
    init: For optional tensors (a head the checkpoint may lack): "normal", "ones" or "zeros".
  """

  name: str
  hf_shape: tuple[int, ...]
  view: tuple[int, ...]
  perm: tuple[int, ...]
  select: tuple[int, int, int] | None = None
  stacked: bool = False
  init: str | None = None

  def names(self, num_layers: int) -> list[str]:
    return [self.name.format(i) for i in range(num_layers)] if self.stacked else [self.name]


def same(name: str, shape, **kw) -> Source:
  shape = tuple(shape)
  return Source(name, shape, shape, tuple(range(len(shape))), **kw)


def linear(name: str, n_in: int, n_out, **kw) -> Source:
  """torch `nn.Linear` weight [out, in] -> our kernel [in, *out]; n_out may be (heads, dim)."""
  out = (n_out,) if isinstance(n_out, int) else tuple(n_out)
  return Source(name, (math.prod(out), n_in), (*out, n_in), (len(out), *range(len(out))), **kw)


def linear_out(name: str, n_in: tuple[int, int], n_out: int, **kw) -> Source:
  """`nn.Linear` weight [out, heads * dim] -> our `ProjectOut` kernel [heads, dim, out]."""
  return Source(name, (n_out, math.prod(n_in)), (n_out, *n_in), (1, 2, 0), **kw)


def heads(name: str, shape: tuple[int, int], **kw) -> Source:
  """A bias [heads * dim] -> [heads, dim]."""
  return Source(name, (math.prod(shape),), tuple(shape), (0, 1), **kw)


def norm(sources: dict, path: Path, prefix: str, cfg: ModelConfig, *, bias: bool, **kw) -> None:
  sources[(*path, "scale")] = same(f"{prefix}.weight", (cfg.d_model,), **kw)
  if bias:
    sources[(*path, "bias")] = same(f"{prefix}.bias", (cfg.d_model,), **kw)


def setting(hf: Mapping[str, Any], key: str, default=None, *, required: bool = True):
  value = hf.get(key, default)
  if value is None and required:
    raise ValueError(f"config.json has no {key!r}, which this model_type needs")
  return value


def activation(hf: Mapping[str, Any], key: str, allowed: Mapping[str, str]) -> str:
  act = hf.get(key)
  if act not in allowed:
    raise ValueError(
      f"config.json {key}={act!r} is not supported; supported: {', '.join(sorted(allowed))}"
    )
  return allowed[act]


def refuse(hf: Mapping[str, Any], key: str, ok: Callable[[Any], bool], why: str) -> None:
  if key in hf and not ok(hf[key]):
    raise ValueError(f"config.json {key}={hf[key]!r} cannot be honoured: {why}")

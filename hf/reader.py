"""Import a Hugging Face model directory into the project's NNX models, placed by shard.

  ckpt = HFCheckpoint("/path/to/SmolLM-135M")   # config.json + headers only; every check here
  model = ckpt.load()                           # one device, or:
  model = ckpt.load(shardings=...)              # each parameter straight into its sharded layout

`HFCheckpoint` reads config.json and the safetensors headers and checks everything before a
weight is read: the `model_type` (supported ones listed), config fields the model cannot honour
(`families`), and the tensors (the first missing, unexpected or mis-shaped one named with its
shape). Loading builds the model abstractly (`nnx.eval_shape`) and creates every parameter device
shard by device shard (`_place`, as `jax.make_array_from_callback` but one host shard at a time):
each shard is read from the files (only the rows/columns it needs, by positioned reads, one
layer at a time for stacked parameters) and cast to the parameter dtype, so beyond the placed
parameters the host holds about one device shard and one read chunk, never a second copy of the
checkpoint (`experiments/benchmarks/convert.py` measures the peak RSS).

dtypes: parameters are stored in the checkpoint's own dtype (that of the token embeddings) unless
`param_dtype` is given; computation runs in `dtype` (default: the same), as `transformers` does
with `dtype="auto"`.
"""

import json
import math
import os
import pathlib
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx

from reslm.hf import families
from reslm.hf.weights import WeightFile
from reslm.models import build_model
from reslm.models.config import DTYPES, ModelConfig

# safetensors dtypes a parameter may be stored in, by our dtype names.
_STORED = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
  """config.json of a model directory (one-line errors for a missing or unreadable file)."""
  path = pathlib.Path(directory) / "config.json"
  if not pathlib.Path(directory).is_dir():
    raise ValueError(f"--hf_dir={directory} is not a directory")
  if not path.exists():
    raise ValueError(f"{directory} has no config.json (a Hugging Face model directory has one)")
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


class HFCheckpoint:
  """A checked Hugging Face checkpoint, ready to load.

  Args:
    directory: The model directory (config.json, model.safetensors or an index + shards).
    dtype: Compute dtype name (default: the parameter dtype).
    param_dtype: Parameter dtype name (default: the checkpoint's stored dtype).
    overrides: Extra `model.*` settings (e.g. {"scan_layers": False, "remat": "dots"}); the
      architecture settings come from config.json and cannot be overridden.

  Attributes:
    hf_config: config.json as a dict.
    model_type: Its `model_type`.
    cfg: The `ModelConfig` that reproduces the architecture.
    sources: Parameter path -> `families.Source`.
    names: Parameter path -> the tensor names in this checkpoint (one per layer when stacked),
      or None for an optional head the checkpoint lacks (freshly initialised).
    notes: What was not imported or was initialised, one line each.

  Raises:
    ValueError: One line, before any weight is read: see the module docstring.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    overrides: dict[str, Any] | None = None,
  ):
    self.directory = pathlib.Path(directory)
    self.hf_config = read_config(directory)
    self.model_type = self.hf_config.get("model_type")
    family = families.family_of(self.model_type)
    self.weights = WeightFile(directory)  # Headers only; no weights, truncation is an error.
    keys = frozenset(self.weights.keys())
    settings = family.settings(self.hf_config, keys)
    stored = self._stored_dtype()
    settings["param_dtype"] = param_dtype or stored
    settings["dtype"] = dtype or settings["param_dtype"]
    architecture = set(settings)
    for key, value in (overrides or {}).items():
      if key in architecture and key not in ("dtype", "param_dtype"):
        raise ValueError(
          f"model.{key} comes from config.json ({settings[key]!r}) and cannot be overridden"
        )
      settings[key] = value
    self.cfg = ModelConfig.from_config_dict(settings)
    self.sources = families.sources_for(self.model_type, self.cfg)
    self.notes: list[str] = []
    self.names = self._match_tensors(keys)

  def _stored_dtype(self) -> str:
    """The dtype of the token embeddings, the checkpoint's parameter dtype."""
    names = self.weights.keys()
    ends = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
    embed = next((k for k in names if k.endswith(ends)), None)
    stored = self.weights.dtype(embed) if embed else "float32"
    if stored not in _STORED:
      raise ValueError(
        f"{self.directory}: parameters stored as {stored} are not supported; supported: "
        f"{', '.join(_STORED)}"
      )
    return _STORED[stored]

  def _match_tensors(self, keys: frozenset[str]) -> dict[tuple, list[str] | None]:
    """Checks the tensors against the config; returns each parameter's tensor names."""
    family = families.family_of(self.model_type)
    prefix = families.base_prefix(self.model_type)
    # A bare base-model checkpoint (LlamaModel, GPT2Model, BertModel) has no base prefix.
    strip = not any(k.startswith(prefix) for k in keys)

    def actual(name: str) -> str:
      return name[len(prefix) :] if strip and name.startswith(prefix) else name

    n = self.cfg.num_layers
    names: dict[tuple, list[str] | None] = {}
    used: set[str] = set()
    missing_optional = []
    for path, src in self.sources.items():
      wanted = [actual(x) for x in src.names(n)]
      absent = [x for x in wanted if x not in keys]
      if absent and src.init is not None and len(absent) == len(wanted):
        names[path] = None
        missing_optional.append(wanted[0])
        continue
      if absent:
        raise ValueError(
          f"{self.directory}: tensor {absent[0]!r} (shape {list(src.hf_shape)}) is missing; "
          f"a {self.model_type} model with this config.json needs it"
          + (f" ({len(absent)} tensors missing)" if len(absent) > 1 else "")
        )
      for x in wanted:
        shape = self.weights.shape(x)
        if shape != src.hf_shape:
          raise ValueError(
            f"{self.directory}: tensor {x!r} has shape {list(shape)} but config.json implies "
            f"{list(src.hf_shape)}"
          )
      names[path] = wanted
      used.update(wanted)
    present_optional = [p for p, s in self.sources.items() if s.init and names[p] is not None]
    if missing_optional and present_optional:
      first = next(x for x in missing_optional)
      raise ValueError(f"{self.directory}: tensor {first!r} is missing (its head is incomplete)")
    if missing_optional:
      self.notes.append(
        f"{self.directory} has no masked-LM head ({missing_optional[0]}, ...): it is initialised "
        "fresh (N(0, initializer_range)), as transformers does"
      )
    self._check_leftovers(keys - used, family)
    return names

  def _check_leftovers(self, extra: set[str], family) -> None:
    """Tensors the model does not use: buffers and tied copies pass, known heads get a note,
    anything else is an error."""
    tied = set()
    if self.cfg.tie_embeddings:
      tied = {"lm_head.weight", "cls.predictions.decoder.weight", "lm_head.decoder.weight"}
    tied |= {"cls.predictions.decoder.bias", "lm_head.decoder.bias"}  # Copies of the head bias.
    unused = []
    for name in sorted(extra):
      if name in tied or name.endswith(family.buffers):
        continue
      if name.startswith(getattr(family, "unused_heads", ())):
        unused.append(name)
        continue
      raise ValueError(
        f"{self.directory}: unexpected tensor {name!r} with shape "
        f"{list(self.weights.shape(name))}; a {self.model_type} model with this config.json "
        "has no such parameter"
      )
    if unused:
      self.notes.append(f"not imported (no such head here): {', '.join(unused)}")

  # ---- loading -----------------------------------------------------------------------------

  def abstract(self):
    """(graphdef, pure-dict state of ShapeDtypeStructs) of the model, no arrays created."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(self.cfg)))
    return graphdef, nnx.to_pure_dict(state)

  def shard(self, path: tuple, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    """The part `index` of parameter `path` (full shape `shape`) in the parameter dtype."""
    src = self.sources[path]
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=True))
    dtype = DTYPES[self.cfg.param_dtype]
    names = self.names[path]
    if names is None:
      return _initial(src, shape, self.cfg.init_std)[index].astype(dtype)
    if not src.stacked:
      return read_part(self.weights, names[0], src, index).astype(dtype, copy=False)
    layers = range(*index[0].indices(shape[0]))
    out = np.empty(
      (
        len(layers),
        *(len(range(*s.indices(n))) for s, n in zip(index[1:], shape[1:], strict=True)),
      ),
      dtype,
    )
    for j, i in enumerate(layers):  # One layer's slice at a time, cast as it is stored.
      out[j] = read_part(self.weights, names[i], src, index[1:])
    return out

  def load(self, shardings=None) -> nnx.Module:
    """The model with the checkpoint's weights.

    Args:
      shardings: A pytree like the model's pure-dict state with a `jax.sharding.Sharding` per
        parameter (e.g. NamedShardings from the mesh and rules); default: this process's first
        device.

    Returns:
      The model (`DecoderLM` or `EncoderLM`).
    """
    graphdef, abstract = self.abstract()
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      placed = [device] * len(flat)
    else:
      placed = jax.tree_util.tree_leaves(shardings)
    for note in self.notes:
      warn(note)
    arrays = []
    for (keypath, leaf), sharding in zip(flat, placed, strict=True):
      path = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keypath)
      if path not in self.sources:
        raise ValueError(f"no checkpoint tensor maps to parameter {'/'.join(map(str, path))}")
      shape = tuple(leaf.shape)
      arrays.append(_place(shape, sharding, lambda i, p=path, s=shape: self.shard(p, i, s)))
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, arrays))

  def close(self) -> None:
    self.weights.close()


def _place(shape: tuple[int, ...], sharding, fetch) -> jax.Array:
  """A global array of `sharding` whose device shards are `fetch(index)`, placed one at a time.

  Like `jax.make_array_from_callback`, which, however, holds every local device's host shard at
  once (a whole parameter) before placing them; here one host shard exists at a time (a
  replicated parameter is read once for all its devices).
  """
  arrays, last = [], (None, None)
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key != last[0]:
      last = (key, None)  # Drop the previous host shard before reading the next.
      last = (key, fetch(index))
    arrays.append(jax.device_put(last[1], device))
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _initial(src: families.Source, shape, init_std: float) -> np.ndarray:
  """An optional parameter the checkpoint lacks, as transformers initialises it."""
  if src.init == "ones":
    return np.ones(shape, np.float32)
  if src.init == "zeros":
    return np.zeros(shape, np.float32)
  return (init_std * np.random.default_rng(0).standard_normal(shape)).astype(np.float32)


def _view_groups(hf_shape, view) -> list[tuple[int, int]]:
  """Which consecutive view axes each HF axis was reshaped into: [(first, stop), ...]."""
  groups, j = [], 0
  for n in hf_shape:
    start, size = j, 1
    while True:
      size *= view[j]
      j += 1
      if size == n:
        break
      if size > n or j == len(view):
        raise ValueError(f"view {view} is not a reshape of {hf_shape}")
    groups.append((start, j))
  if j != len(view):
    raise ValueError(f"view {view} is not a reshape of {hf_shape}")
  return groups


def read_part(weights: WeightFile, name: str, src: families.Source, index) -> np.ndarray:
  """One layer's part `index` (slices over our per-layer axes) of tensor `name`.

  Reads only the HF rows/columns covering it: an HF axis that was split into (outer, inner...)
  view axes is read over the outer slice with whole inner axes (at most one head of slack),
  then reshaped and cut; `select` offsets a fused tensor's part.
  """
  view = src.view
  wanted: list[slice] = [slice(None)] * len(view)
  for j, s in enumerate(index):
    wanted[src.perm[j]] = s  # Our axis j is view axis perm[j].
  wanted = [slice(*s.indices(n)) for s, n in zip(wanted, view, strict=True)]
  hf_shape = list(src.hf_shape)
  offset = [0] * len(hf_shape)
  if src.select is not None:
    dim, start, stop = src.select
    hf_shape[dim], offset[dim] = stop - start, start
  reads, shape, cut = [], [], []
  for i, (a, b) in enumerate(_view_groups(hf_shape, view)):
    inner = math.prod(view[a + 1 : b])
    outer = wanted[a]
    reads.append(slice(offset[i] + outer.start * inner, offset[i] + outer.stop * inner))
    shape += [outer.stop - outer.start, *view[a + 1 : b]]
    cut += [slice(None), *wanted[a + 1 : b]]
  block = weights.read(name, tuple(reads))
  return np.transpose(block.reshape(shape)[tuple(cut)], src.perm)

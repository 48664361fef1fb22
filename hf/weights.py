"""Hugging Face safetensors checkpoints: lazy reading by tensor name, and sharded writing.

A checkpoint directory holds `model.safetensors`, or shards listed by
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file). `WeightFile` opens the
headers only; a tensor (or a slice of one) is read when asked for, straight from the memory-mapped
file in its stored dtype, so a loader can build each device's shard without holding a whole
checkpoint in host memory.
"""

import contextlib
import json
import math
import os
import pathlib
from collections.abc import Iterator, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with NumPy: safetensors reads them then)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# safetensors dtype names, for headers read without NumPy.
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip


def _header(path: pathlib.Path) -> dict:
  """The JSON header of one safetensors file, checked against the file's size (truncation)."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"{path} is not a safetensors file (only {size} bytes)")
    n = int.from_bytes(raw, "little")
    if n > size - 8:
      raise ValueError(f"{path} is truncated or not a safetensors file (header of {n} bytes)")
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  end = max((t["data_offsets"][1] for t in header.values()), default=0)
  if 8 + n + end > size:
    raise ValueError(
      f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}"
    )
  return header


class WeightFile:
  """The tensors of a checkpoint directory, by name, read lazily.

  Args:
    directory: A Hugging Face model directory.

  Raises:
    ValueError: No weights in the directory, a truncated file, or an index naming a missing shard.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    index = self.directory / INDEX
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
    elif (self.directory / SINGLE).exists():
      weight_map = None
    else:
      raise ValueError(
        f"{self.directory} has no weights: neither {SINGLE} nor {INDEX} (only .safetensors "
        "checkpoints are read; convert .bin/.pt files with transformers first)"
      )
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
    self._specs: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for name in files:
      path = self.directory / name
      if not path.exists():
        raise ValueError(f"{INDEX} in {self.directory} names a missing shard {name}")
      for key, t in _header(path).items():
        self._specs[key] = (name, tuple(t["shape"]), _DTYPES.get(t["dtype"], t["dtype"]))
    if weight_map:
      missing = sorted(set(weight_map) - set(self._specs))
      if missing:
        raise ValueError(f"{INDEX} lists {missing[0]!r}, which no shard holds")
    self._open: dict[str, object] = {}
    self._stack = contextlib.ExitStack()

  def keys(self) -> list[str]:
    return sorted(self._specs)

  def __contains__(self, name: str) -> bool:
    return name in self._specs

  def shape(self, name: str) -> tuple[int, ...]:
    return self._specs[name][1]

  def dtype(self, name: str) -> str:
    return self._specs[name][2]

  def nbytes(self) -> int:
    return sum(math.prod(s) * np.dtype(d).itemsize for _, s, d in self._specs.values())

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """Tensor `name` (or `index` of it: slices per leading dim) in its stored dtype."""
    file, _, _ = self._specs[name]
    if file not in self._open:
      self._open[file] = self._stack.enter_context(
        safe_open(self.directory / file, framework="numpy")
      )
    handle = self._open[file]
    try:
      if index is None:
        return handle.get_tensor(name)
      return handle.get_slice(name)[index]
    except SafetensorError as e:
      raise ValueError(f"{self.directory / file}: cannot read {name!r}: {e}") from None

  def close(self) -> None:
    self._stack.close()
    self._open.clear()

  def __enter__(self) -> "WeightFile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def save_sharded(
  tensors: Iterator[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
  directory: str | os.PathLike,
  *,
  max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
  """Writes tensors as safetensors shards (+ an index when more than one), as `save_pretrained`.

  Tensors are consumed one at a time and each shard is written when full, so a caller can produce
  them lazily (e.g. gathered from devices layer by layer) and host memory holds one shard.

  Returns:
    The file names written.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  items = tensors.items() if isinstance(tensors, Mapping) else tensors
  parts: list[tuple[pathlib.Path, list[str]]] = []
  shard: dict[str, np.ndarray] = {}
  size = total = 0

  def write():
    path = directory / f".part-{len(parts):05d}.safetensors"  # Renamed once the count is known.
    save_file(shard, str(path), metadata={"format": "pt"})
    parts.append((path, list(shard)))

  for name, array in items:
    array = np.ascontiguousarray(array)
    if shard and size + array.nbytes > max_shard_bytes:
      write()
      shard, size = {}, 0
    shard[name] = array
    size += array.nbytes
    total += array.nbytes
  if shard or not parts:
    write()
  many = len(parts) > 1
  written, weight_map = [], {}
  for i, (path, names) in enumerate(parts):
    name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" if many else SINGLE
    path.rename(directory / name)
    written.append(name)
    weight_map.update(dict.fromkeys(names, name))
  if many:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    written.append(INDEX)
  return written

"""Hugging Face safetensors checkpoints: lazy reading by tensor name, and sharded writing.

A checkpoint directory holds `model.safetensors`, or shards listed by
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file). `WeightFile` opens the
headers only; a tensor (or a slice of one) is read when asked for, in its stored dtype, with
positioned reads of just the rows it needs (not a memory map: mapped pages a loader has touched
stay in its resident memory until the file is closed, which would count a second copy of the
checkpoint against the host), so a loader can build each device's shard without holding a whole
checkpoint in host memory.
"""

import json
import math
import os
import pathlib
from collections.abc import Iterator, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with NumPy: safetensors reads them then)
import numpy as np
from safetensors.numpy import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CHUNK_BYTES = 8 * 2**20  # Largest single read when only some columns of the rows are wanted.
# safetensors dtype names, for headers read without NumPy.
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip


def _header(path: pathlib.Path) -> tuple[dict, int]:
  """The JSON header of one safetensors file, checked against the file's size (truncation), and
  where its data starts."""
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
  return header, 8 + n


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
    # name -> (file, shape, dtype, first byte in the file)
    self._specs: dict[str, tuple[str, tuple[int, ...], str, int]] = {}
    for name in files:
      path = self.directory / name
      if not path.exists():
        raise ValueError(f"{INDEX} in {self.directory} names a missing shard {name}")
      header, start = _header(path)
      for key, t in header.items():
        shape, dtype = tuple(t["shape"]), _DTYPES.get(t["dtype"], t["dtype"])
        begin, end = t["data_offsets"]
        if dtype in _DTYPES.values() and end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
          raise ValueError(
            f"{path}: tensor {key!r} of shape {list(shape)} ({dtype}) has {end - begin} bytes"
          )
        self._specs[key] = (name, shape, dtype, start + begin)
    if weight_map:
      missing = sorted(set(weight_map) - set(self._specs))
      if missing:
        raise ValueError(f"{INDEX} lists {missing[0]!r}, which no shard holds")
    self._fds: dict[str, int] = {}

  def keys(self) -> list[str]:
    return sorted(self._specs)

  def __contains__(self, name: str) -> bool:
    return name in self._specs

  def shape(self, name: str) -> tuple[int, ...]:
    return self._specs[name][1]

  def dtype(self, name: str) -> str:
    return self._specs[name][2]

  def nbytes(self) -> int:
    return sum(math.prod(s) * np.dtype(d).itemsize for _, s, d, _ in self._specs.values())

  def read(
    self, name: str, index: tuple[slice, ...] | None = None, *, chunk_bytes: int = CHUNK_BYTES
  ) -> np.ndarray:
    """Tensor `name` (or `index` of it: slices per leading dim) in its stored dtype.

    Reads the rows of the first axis that `index` selects, at most `chunk_bytes` of whole rows at
    a time (one contiguous read each), cutting the other axes of each chunk into the result: the
    host holds the result plus one chunk, however few columns are wanted.
    """
    file, shape, dtype, begin = self._specs[name]
    try:
      dt = np.dtype(dtype)
    except TypeError:
      raise ValueError(f"{self.directory / file}: {name!r} has unsupported dtype {dtype}") from None
    index = tuple(index or ())
    if not shape:
      return self._pread(file, begin, 1, dt).reshape(())
    rows = range(*(index[0] if index else slice(None)).indices(shape[0]))
    row = math.prod(shape[1:])
    per = max(1, chunk_bytes // max(1, row * dt.itemsize))  # Rows per read.
    out = None
    for first in range(0, len(rows), per):
      part = rows[first : first + per]
      lo, hi = min(part), max(part) + 1
      block = self._pread(file, begin + lo * row * dt.itemsize, (hi - lo) * row, dt)
      block = block.reshape(hi - lo, *shape[1:])
      if part.step != 1:
        block = block[[i - lo for i in part]]
      block = block[(slice(None), *index[1:])]
      if first == 0 and len(part) == len(rows):
        return block  # One read: the block (or a view of it) is the result.
      if out is None:
        out = np.empty((len(rows), *block.shape[1:]), dt)
      out[first : first + len(part)] = block
    if out is None:  # No rows selected.
      empty = np.empty((0, *shape[1:]), dt)
      return empty[(slice(None), *index[1:])]
    return out

  def _pread(self, file: str, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
    """`count` items of `dtype` at byte `offset` of `file`, read into a new array."""
    if file not in self._fds:
      self._fds[file] = os.open(self.directory / file, os.O_RDONLY)
    out = np.empty(count, dtype)
    view = memoryview(out.view(np.uint8)) if count else memoryview(b"")
    done = 0
    while done < len(view):  # One call reads at most ~2 GiB on Linux.
      n = os.preadv(self._fds[file], [view[done:]], offset + done)
      if n == 0:
        raise ValueError(f"{self.directory / file} ended early reading tensor data")
      done += n
    return out

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds.clear()

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

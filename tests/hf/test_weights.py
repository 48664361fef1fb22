"""safetensors reading by positioned reads (any slice, in the stored dtype, chunked) and sharded
writing, against NumPy slicing of the arrays written."""

import ml_dtypes
import numpy as np
import pytest

from reslm.hf.weights import INDEX, SINGLE, WeightFile, save_sharded

ARRAYS = {
  "a": np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4),
  "b": np.linspace(-2, 2, 40).astype(ml_dtypes.bfloat16).reshape(8, 5),
  "c": np.arange(7, dtype=np.int64),
}
SLICES = [
  None,
  (slice(1, 3),),
  (slice(None), slice(1, 2), slice(0, 4, 2)),
  (slice(4, 0, -2),),
  (slice(3, 3),),
  (slice(2, 5), slice(None), slice(3, 4)),
]


@pytest.mark.parametrize("max_shard_bytes", [10**9, 200])
def test_reads_equal_numpy_slicing(tmp_path, max_shard_bytes):
  written = save_sharded(ARRAYS, tmp_path, max_shard_bytes=max_shard_bytes)
  assert (INDEX in written) == (max_shard_bytes == 200)
  assert (SINGLE in written) == (max_shard_bytes != 200)
  with WeightFile(tmp_path) as weights:
    assert weights.keys() == ["a", "b", "c"] and weights.dtype("b") == "bfloat16"
    assert weights.nbytes() == sum(a.nbytes for a in ARRAYS.values())
    for index in SLICES:
      want = ARRAYS["a"] if index is None else ARRAYS["a"][index]
      for chunk in (1, 48, 10**9):  # one row, a few rows, everything per read
        got = weights.read("a", index, chunk_bytes=chunk)
        assert got.dtype == want.dtype and np.array_equal(got, want), (index, chunk)
    got = weights.read("b", (slice(2, 7), slice(1, 4)), chunk_bytes=10)
    assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got, ARRAYS["b"][2:7, 1:4])
    assert np.array_equal(weights.read("c"), ARRAYS["c"])


def test_truncated_shard_is_refused_from_its_header(tmp_path):
  save_sharded(ARRAYS, tmp_path)
  path = tmp_path / SINGLE
  path.write_bytes(path.read_bytes()[:-8])
  with pytest.raises(ValueError, match=r"is truncated: its tensors need \d+ bytes, the file has"):
    WeightFile(tmp_path)

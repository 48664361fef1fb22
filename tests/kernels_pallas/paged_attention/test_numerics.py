"""Rungs 0 and 1: the reference against dense per-sequence attention, and every implementation
against the reference (decode has no gradient), with a bit-identical rerun. Every cache slot a
sequence does not own holds a large value or NaN, and block-table entries past the length are
invalid, so reading them would show."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reslm.kernels_pallas.paged_attention import reference
from tests.kernels_pallas.paged_attention.harness import (
  CASES,
  assert_close,
  inputs,
  reference_result,
  run,
)


def _dense(pool, scales, pages, length):
  """One sequence's [length, kv_heads, head_dim] float32 K or V from its pages."""
  x = pool[:, pages].astype(jnp.float32)
  if scales is not None:
    x = x * scales[:, pages][..., None]
  return x.reshape(x.shape[0], -1, x.shape[-1])[:, :length].transpose(1, 0, 2)


def test_reference_is_dense_attention_per_sequence():
  """Against jax.nn.dot_product_attention on each sequence's gathered, dequantized K/V."""
  for case in (CASES["gqa4_ragged_lengths"], CASES["mqa_int8_defaults"]):
    q, k, v, lengths, tables, ks, vs = inputs(case, "float32")
    got = reference(q, k, v, lengths, tables, k_scale=ks, v_scale=vs)
    for s, length in enumerate(case.lengths):
      if length == 0:
        np.testing.assert_array_equal(got[s], 0)
        continue
      pages = np.asarray(tables[s, : -(-length // case.page_size)])
      keys, values = _dense(k, ks, pages, length), _dense(v, vs, pages, length)
      with jax.default_matmul_precision("highest"):
        want = jax.nn.dot_product_attention(q[s][None, None], keys[None], values[None])
      np.testing.assert_allclose(got[s], want[0, 0], atol=1e-5, rtol=1e-5)


_RESULTS = {}


def pytest_generate_tests(metafunc):
  if "run_id" in metafunc.fixturenames:
    runs = metafunc.cls.RUNS
    metafunc.parametrize("run_id", runs, ids=[f"{c}-{d}" for c, d in runs])


ALL_F32 = [(name, "float32") for name in CASES]
BF16 = [("gqa4_ragged_lengths", "bfloat16"), ("mqa_int8_defaults", "bfloat16")]


class NumericsBase:
  IMPLEMENTATION = "reference"
  INTERPRET = False
  RUNS = ALL_F32

  def blocks(self, case):
    return None

  def test_matches_reference(self, run_id):
    case, dtype = CASES[run_id[0]], run_id[1]
    args = inputs(case, dtype)
    fn, out = run(
      args, implementation=self.IMPLEMENTATION, interpret=self.INTERPRET, blocks=self.blocks(case)
    )
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    assert_close(out, reference_result(case, dtype), dtype)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(fn(*args)))


class TestAutoOnCpu(NumericsBase):
  IMPLEMENTATION = "auto"
  RUNS = [("gqa4_ragged_lengths", "float32")]


class KernelBase(NumericsBase):
  INTERPRET = True
  RUNS = ALL_F32 + BF16

  def test_nan_outside_the_sequences_does_not_leak(self):
    """Unused pages and page tails full of NaN (k and v, or the scales of int8 pages, which cannot
    hold NaN) leave the output equal to the reference on the clean cache."""
    case = CASES["mqa_int8_defaults" if self.IMPLEMENTATION == "gpu" else "gqa4_ragged_lengths"]
    dirty = inputs(case, "float32", poison=float("nan"))
    _, out = run(
      dirty, implementation=self.IMPLEMENTATION, interpret=True, blocks=self.blocks(case)
    )
    assert_close(out, reference_result(case, "float32"), "float32")


class TestTpuInterpret(KernelBase):
  IMPLEMENTATION = "tpu"

  def blocks(self, case):
    return case.tpu_blocks


class TestGpuInterpret(KernelBase):
  IMPLEMENTATION = "gpu"
  RUNS = ALL_F32 + BF16[1:]

  def blocks(self, case):
    return case.gpu_blocks


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
class TestTpuDevice(TestTpuInterpret):
  INTERPRET = False


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
class TestGpuDevice(TestGpuInterpret):
  INTERPRET = False

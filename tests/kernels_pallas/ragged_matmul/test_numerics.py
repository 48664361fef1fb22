"""Rung 1, numerics: every implementation against `jax.lax.ragged_dot` (float32 HIGHEST): the
output, d lhs and d rhs (random cotangent), a bit-identical rerun, and NaN isolation between
groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels_pallas.ragged_matmul.harness import (
  CASES,
  assert_close,
  inputs,
  kernel_runner,
  reference_results,
)

_RESULTS = {}
_REFERENCE = {}


def pytest_generate_tests(metafunc):
  if "run" in metafunc.fixturenames:
    runs = metafunc.cls.RUNS
    metafunc.parametrize("run", runs, ids=[f"{c}-{d}" for c, d in runs])


ALL_F32 = [(name, "float32") for name in CASES]
BF16 = [("ragged_empty_tail", "bfloat16")]


class NumericsBase:
  IMPLEMENTATION = "reference"
  INTERPRET = False
  RUNS = ALL_F32

  def blocks(self, case):
    return None

  def results(self, run):
    key = (type(self).__name__, *run)
    if key not in _RESULTS:
      case, dtype = CASES[run[0]], run[1]
      fn = kernel_runner(self.IMPLEMENTATION, self.INTERPRET, self.blocks(case))
      args, sizes, d_out = inputs(case, dtype)
      _RESULTS[key] = (fn, (args, sizes, d_out), jax.block_until_ready(fn(args, sizes, d_out)))
    if run not in _REFERENCE:
      _REFERENCE[run] = reference_results(CASES[run[0]], run[1])
    return _RESULTS[key], _REFERENCE[run]

  def test_matches_reference(self, run):
    """Output and both gradients within tolerance of ragged_dot; a rerun is bit-identical."""
    (fn, call_args, first), (ref_out, ref_grads) = self.results(run)
    out, grads = first
    (lhs, rhs), _, _ = call_args
    assert out.dtype == lhs.dtype and out.shape == (lhs.shape[0], rhs.shape[2])
    assert_close(out, ref_out, run[1], "out")
    for name, x, got, want in zip(("lhs", "rhs"), (lhs, rhs), grads, ref_grads, strict=True):
      assert got.dtype == x.dtype and got.shape == x.shape
      assert_close(got, want, run[1], f"d{name}")
    second = fn(*call_args)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class TestReference(NumericsBase):
  RUNS = [("ragged_empty_tail", "float32")]


class TestAutoOnCpu(NumericsBase):
  """ "auto" on a CPU host: platform_dependent takes the reference branch."""

  IMPLEMENTATION = "auto"
  RUNS = [("empty_ends_two_n_tiles", "float32")]


class KernelBase(NumericsBase):
  INTERPRET = True
  RUNS = ALL_F32 + BF16

  def test_nan_in_one_group_does_not_leak(self):
    """NaN in group 2's tokens and in group 4's weights: every other group's output rows, d lhs
    rows and d rhs blocks equal the reference computed without the NaNs. (XLA:CPU's ragged_dot,
    a dense product over every group, does leak them: the kernels must not.)"""
    case = CASES["ragged_empty_tail"]
    (lhs, rhs), sizes, d_out = inputs(case, "float32")
    bounds = np.cumsum((0, *case.sizes))
    rows = np.arange(case.m)
    poisoned = (rows >= bounds[2]) & (rows < bounds[3])
    poisoned_rows = (rows >= bounds[4]) & (rows < bounds[5])  # Rows that use rhs[4].
    nan_lhs = lhs.at[bounds[2] + 3].set(jnp.nan)
    nan_rhs = rhs.at[4, 7].set(jnp.nan)
    fn = kernel_runner(self.IMPLEMENTATION, self.INTERPRET, self.blocks(case))
    out, (d_lhs, d_rhs) = fn((nan_lhs, nan_rhs), sizes, d_out)
    clean = kernel_runner("reference", False, None)
    ref_out, (ref_dl, ref_dr) = clean((lhs, rhs), sizes, d_out)
    keep = ~(poisoned | poisoned_rows)
    assert_close(np.asarray(out)[keep], np.asarray(ref_out)[keep], "float32", "out rows")
    assert_close(np.asarray(d_lhs)[keep], np.asarray(ref_dl)[keep], "float32", "d lhs rows")
    for g in (0, 1, 3):
      assert_close(d_rhs[g], ref_dr[g], "float32", f"d rhs[{g}]")
    assert np.isnan(np.asarray(out)[bounds[2] + 3]).all()


class TestTpuInterpret(KernelBase):
  """The Mosaic TPU kernels in the Pallas interpreter (always runs)."""

  IMPLEMENTATION = "tpu"

  def blocks(self, case):
    return case.tpu_blocks


class TestGpuInterpret(KernelBase):
  """The Triton kernels in the Pallas interpreter (always runs)."""

  IMPLEMENTATION = "gpu"

  def blocks(self, case):
    return case.gpu_blocks


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
class TestTpuDevice(TestTpuInterpret):
  INTERPRET = False


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
class TestGpuDevice(TestGpuInterpret):
  INTERPRET = False

"""Rung 1, numerics: every implementation against the float32 HIGHEST reference.

`NumericsBase` holds the tests; each subclass names an implementation and the (case, dtype) runs it
covers. The interpret subclasses always run on CPU; the on-device ones only on their hardware. The
output and the VJP w.r.t. x (random cotangent) are compared with dtype-scaled tolerances, and a
second run must be bit-identical.
"""

import jax
import numpy as np
import pytest

from tests.kernels_pallas.quant_matmul.harness import (
  CASES,
  assert_close,
  inputs,
  kernel_runner,
  reference_results,
)

_RESULTS = {}  # (class, case, dtype) -> (runner, args, g, results): one compile per run.
_REFERENCE = {}


def pytest_generate_tests(metafunc):
  if "run" in metafunc.fixturenames:
    runs = metafunc.cls.RUNS
    metafunc.parametrize("run", runs, ids=[f"{c}-{d}" for c, d in runs])


ALL_F32 = [(name, "float32") for name in CASES]
BF16 = [
  (n, "bfloat16") for n in ("int8_ragged_tiles", "int4_g32_two_k_tiles", "int4_g128_padded_k")
]


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
      fn = kernel_runner(case, self.IMPLEMENTATION, self.INTERPRET, self.blocks(case))
      args, g = inputs(case, dtype)
      _RESULTS[key] = (fn, args, g, jax.block_until_ready(fn(args, g)))
    if run not in _REFERENCE:
      _REFERENCE[run] = reference_results(CASES[run[0]], run[1])
    return _RESULTS[key], _REFERENCE[run]

  def test_matches_reference(self, run):
    """Output and dx within tolerance of the reference; a rerun is bit-identical."""
    (fn, args, g, first), (ref_out, ref_dx) = self.results(run)
    out, dx = first
    case = CASES[run[0]]
    assert out.shape == (*case.lead, case.n)
    assert out.dtype == ref_out.dtype or out.dtype == args[0].dtype
    assert_close(out, ref_out, run[1], "out")
    if ref_dx is not None:
      assert dx.dtype == args[0].dtype and dx.shape == args[0].shape
      assert_close(dx, ref_dx, run[1], "dx")
    second = fn(args, g)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class TestReference(NumericsBase):
  """The "reference" implementation through the custom VJP (explicit dx formula)."""

  RUNS = [("int8_ragged_tiles", "bfloat16")]


class TestAutoOnCpu(NumericsBase):
  """ "auto" on a CPU host: platform_dependent takes the reference branch."""

  IMPLEMENTATION = "auto"
  RUNS = [("int4_g128_padded_k", "float32"), ("w8a8_scaled", "float32")]


class TestTpuInterpret(NumericsBase):
  """The Mosaic TPU kernels in the Pallas interpreter (always runs)."""

  IMPLEMENTATION = "tpu"
  INTERPRET = True
  RUNS = ALL_F32 + BF16

  def blocks(self, case):
    return case.tpu_blocks


class TestGpuInterpret(NumericsBase):
  """The Triton kernels in the Pallas interpreter (always runs)."""

  IMPLEMENTATION = "gpu"
  INTERPRET = True
  # Padding is the only difference between the remaining cases on GPU: keep one per kind.
  RUNS = [r for r in ALL_F32 if r[0] not in ("int4_g64_decode_defaults", "w8a8_int32")] + BF16[1:]

  def blocks(self, case):
    return case.gpu_blocks


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
class TestTpuDevice(TestTpuInterpret):
  INTERPRET = False


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
class TestGpuDevice(TestGpuInterpret):
  INTERPRET = False

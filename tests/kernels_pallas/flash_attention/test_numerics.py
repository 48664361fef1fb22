"""Rung 1, numerics: every implementation against the float32 HIGHEST reference.

`NumericsBase` holds the tests; each subclass names an implementation and the (case, dtype) runs it
covers. The interpret subclasses always run on CPU; the on-device ones run only on their hardware.
Forward output, log-sum-exp and the VJP (random cotangents for both outputs) are compared with
dtype-scaled tolerances, and a second run must be bit-identical.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from tests.kernels_pallas.flash_attention.harness import (
  CASES,
  assert_close,
  inputs,
  kernel_runner,
  reference_results,
)

_RESULTS = {}  # (class, case, dtype) -> (runner, kernel results): one compile per run.
_REFERENCE = {}


def pytest_generate_tests(metafunc):
  if "run" in metafunc.fixturenames:
    runs = metafunc.cls.RUNS
    metafunc.parametrize("run", runs, ids=[f"{c}-{d}" for c, d in runs])


ALL_F32 = [(name, "float32") for name in CASES]


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
      args, cotangents, _ = inputs(case, dtype)
      _RESULTS[key] = (fn, args, cotangents, jax.block_until_ready(fn(args, cotangents)))
    if run not in _REFERENCE:
      _REFERENCE[run] = reference_results(CASES[run[0]], run[1])
    return _RESULTS[key], _REFERENCE[run]

  def test_matches_reference(self, run):
    """Forward (out, lse) and VJP within tolerance of the reference; a rerun is bit-identical."""
    (fn, args, cotangents, first), ((ref_out, ref_lse), ref_grads) = self.results(run)
    (out, lse), grads = first
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    assert lse.dtype == jnp.float32 and lse.shape == args[0].shape[:3]
    assert_close(out, ref_out, run[1], "out")
    assert_close(lse, ref_lse, run[1], "lse")
    for name, x, got, want in zip("qkv", args, grads, ref_grads, strict=True):
      assert got.dtype == x.dtype and got.shape == x.shape
      assert_close(got, want, run[1], f"d{name}")
    second = fn(args, cotangents)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class TestReference(NumericsBase):
  """The "reference" implementation through the custom VJP (its backward is jax.vjp of itself)."""

  RUNS = [("causal_mqa_cross_segments", "float32"), ("causal_gqa2_ragged", "bfloat16")]


class TestAutoOnCpu(NumericsBase):
  """ "auto" on a CPU host: platform_dependent takes the reference branch."""

  IMPLEMENTATION = "auto"
  RUNS = [("causal_mqa_cross_segments", "float32")]


class TestTpuInterpret(NumericsBase):
  """The Mosaic TPU kernels in the Pallas interpreter (always runs)."""

  IMPLEMENTATION = "tpu"
  INTERPRET = True
  RUNS = ALL_F32 + [("causal_gqa2_ragged", "bfloat16"), ("causal_mqa_cross_segments", "bfloat16")]

  def blocks(self, case):
    return case.tpu_blocks

  @pytest.mark.parametrize("name", ["causal_gqa2_ragged", "bidir_exact_bwd_tiles"])
  def test_matches_jax_nn_dot_product_attention(self, name):
    """Forward and VJP agree with jax.nn.dot_product_attention (XLA) on the same float32 inputs."""
    (fn, args, (d_out, _), ((out, _), _)), _ = self.results((name, "float32"))
    case = CASES[name]

    def attend(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, is_causal=case.causal, implementation="xla")

    with jax.default_matmul_precision("highest"):
      want, vjp = jax.vjp(attend, *args)
      # The cached kernel grads include an lse cotangent; rerun the kernel VJP with d_lse = 0.
      _, got_grads = fn(args, (d_out, jnp.zeros(args[0].shape[:3], jnp.float32)))
      want_grads = vjp(d_out)
    assert_close(out, want, "float32", "out")
    for name_, got, ref in zip("qkv", got_grads, want_grads, strict=True):
      assert_close(got, ref, "float32", f"d{name_}")


class TestGpuInterpret(NumericsBase):
  """The Mosaic GPU kernels in the Mosaic GPU interpreter with race detection (always runs; slow,
  so one case that covers causal, the whole-group dk/dv sum, cross lengths, segments and padding)."""

  IMPLEMENTATION = "gpu"
  INTERPRET = plgpu.InterpretGPUParams(detect_races=True)
  RUNS = [("causal_mqa_cross_segments", "bfloat16")]

  def blocks(self, case):
    return case.gpu_blocks


def _backend():
  return jax.default_backend()


@pytest.mark.skipif(_backend() != "tpu", reason="needs a TPU")
class TestTpuDevice(TestTpuInterpret):
  INTERPRET = False


@pytest.mark.skipif(_backend() != "gpu", reason="needs an NVIDIA Hopper (sm90+) GPU")
class TestGpuDevice(TestGpuInterpret):
  INTERPRET = False
  RUNS = [(name, "bfloat16") for name in CASES]

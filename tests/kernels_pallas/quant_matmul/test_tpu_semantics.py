"""Rung 2, TPU semantics: the TPU kernels (forward and dx) in jax's TPU simulator: NaN-filled
uninitialised memory (a missed accumulator init would show), two simulated cores on the "parallel"
axes in a random order with a race detector, out-of-bounds reads raising, and output blocks that
may only be revisited on consecutive steps."""

import jax
import numpy as np
import pytest

from tests.kernels_pallas.quant_matmul.harness import (
  CASES,
  assert_close,
  inputs,
  kernel_runner,
  races_found,
  reference_results,
  tpu_simulator,
)


@pytest.mark.parametrize(
  ("name", "dtype", "seed"),
  [
    ("int8_ragged_tiles", "bfloat16", 1),
    ("int4_g32_two_k_tiles", "float32", 2),
    ("w8a8_scaled", "float32", 3),
  ],
)
def test_kernels_in_tpu_simulator(name, dtype, seed):
  case = CASES[name]
  args, g = inputs(case, dtype)
  fn = kernel_runner(case, "tpu", False, case.tpu_blocks)  # Rerouted to the simulator.
  with tpu_simulator(seed):
    out, dx = jax.block_until_ready(fn(args, g))
    assert not races_found()
  ref_out, ref_dx = reference_results(case, dtype)
  for got, want, what in ((out, ref_out, "out"), (dx, ref_dx, "dx")):
    if want is not None:
      assert np.isfinite(np.asarray(got, np.float32)).all()
      assert_close(got, want, dtype, what)

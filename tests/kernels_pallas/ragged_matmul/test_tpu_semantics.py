"""Rung 2, TPU semantics: forward, d lhs and d rhs kernels in jax's TPU simulator (NaN-filled
uninitialised memory and output buffers, two simulated cores on the "parallel" axes in a random
order, race detection, out-of-bounds reads raising, consecutive-only output revisits). The visit
list re-addresses output tiles across visits, so this is where an ordering bug would show."""

import jax
import numpy as np
import pytest

from tests.kernels_pallas.ragged_matmul.harness import (
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
  [("ragged_empty_tail", "bfloat16", 1), ("empty_ends_two_n_tiles", "float32", 2)],
)
def test_kernels_in_tpu_simulator(name, dtype, seed):
  case = CASES[name]
  args, sizes, d_out = inputs(case, dtype)
  fn = kernel_runner("tpu", False, case.tpu_blocks)  # Rerouted to the simulator.
  with tpu_simulator(seed):
    out, grads = jax.block_until_ready(fn(args, sizes, d_out))
    assert not races_found()
  ref_out, ref_grads = reference_results(case, dtype)
  for got, want, what in (
    (out, ref_out, "out"),
    *zip(grads, ref_grads, ("d lhs", "d rhs"), strict=True),
  ):
    assert np.isfinite(np.asarray(got, np.float32)).all(), what
    assert_close(got, want, dtype, what)

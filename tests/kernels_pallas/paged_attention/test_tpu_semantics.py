"""Rung 2, TPU semantics: the paged kernel in jax's TPU simulator. Its DMAs are explicit, so this
rung checks what interpret mode cannot: every started copy is waited on the right semaphore and
slot, no page is read past the pool (out-of-bounds DMA raises; block-table entries past a
sequence are -1 / huge), no race between the two simulated cores, scratch initialised (NaN fill)."""

import numpy as np
import pytest

from tests.kernels_pallas.paged_attention.harness import (
  CASES,
  assert_close,
  inputs,
  races_found,
  reference_result,
  run,
  tpu_simulator,
)


@pytest.mark.parametrize(
  ("name", "dtype", "seed"),
  [("gqa4_ragged_lengths", "bfloat16", 1), ("mqa_int8_defaults", "float32", 2)],
)
def test_kernel_in_tpu_simulator(name, dtype, seed):
  case = CASES[name]
  args = inputs(case, dtype)
  with tpu_simulator(seed):
    _, out = run(args, implementation="tpu", blocks=case.tpu_blocks)  # Rerouted to the simulator.
    assert not races_found()
  assert np.isfinite(np.asarray(out, np.float32)).all()
  assert_close(out, reference_result(case, dtype), dtype)

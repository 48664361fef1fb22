"""Rung 2, TPU semantics: the TPU kernels in jax's TPU simulator.

The simulator models HBM/VMEM buffers and DMAs, fills uninitialised memory with NaN, runs the
"parallel" grid axes on two simulated cores in a random order with a race detector, and raises on
out-of-bounds reads and on an output block revisited after the kernel moved on. The flash kernels
must give finite, reference-equal results with no race; toy kernels with the bugs the simulator is
meant to catch (a race, a late output revisit, uninitialised scratch) check that this rung can fail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tests.kernels_pallas.flash_attention.harness import (
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
  [("causal_mqa_cross_segments", "float32", 1), ("causal_gqa2_ragged", "bfloat16", 2)],
)
def test_kernels_in_tpu_simulator(name, dtype, seed):
  case = CASES[name]
  args, cotangents, _ = inputs(case, dtype)
  # interpret=False: the kernels are lowered as for a TPU and the context reroutes them.
  fn = kernel_runner(case, "tpu", False, case.tpu_blocks)
  with tpu_simulator(seed):
    (out, lse), grads = jax.block_until_ready(fn(args, cotangents))
    assert not races_found()
  for x in (out, *grads):
    assert np.isfinite(np.asarray(x, np.float32)).all()
  (ref_out, ref_lse), ref_grads = reference_results(case, dtype)
  assert_close(out, ref_out, dtype, "out")
  assert_close(lse, ref_lse, dtype, "lse")
  for name_, got, want in zip("qkv", grads, ref_grads, strict=True):
    assert_close(got, want, dtype, f"d{name_}")


def _toy_call(kernel, out_index_map, scratch=()):
  """A (2, 2)-grid copy-like kernel over a [16, 128] array with the given output mapping."""
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
    grid=(2, 2),
    in_specs=[pl.BlockSpec((8, 128), lambda i, j: (i, 0))],
    out_specs=pl.BlockSpec((8, 128), out_index_map),
    scratch_shapes=scratch,
    compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
  )


def test_simulator_rejects_a_non_consecutive_output_revisit():
  """Output block j is written at (0, j) and again at (1, j): legal in plain interpret mode,
  rejected by the simulator as a TPU would misbehave."""

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...]

  x = jnp.ones((16, 128), jnp.float32)
  with pytest.raises(Exception, match="[Rr]evisit"), tpu_simulator(0):
    # Built inside the context: pallas_call reads the interpret mode when it is constructed.
    jax.block_until_ready(_toy_call(kernel, lambda i, j: (j, 0))(x))


def test_simulator_exposes_uninitialised_scratch():
  """Reading VMEM scratch that was never written gives NaN in the simulator."""

  def kernel(x_ref, o_ref, acc_ref):
    acc_ref[...] = acc_ref[...] + x_ref[...]  # Missing the init at the first step.
    o_ref[...] = acc_ref[...]

  scratch = [pltpu.VMEM((8, 128), jnp.float32)]
  with tpu_simulator(0):
    call = _toy_call(kernel, lambda i, j: (i, 0), scratch=scratch)
    out = jax.block_until_ready(call(jnp.ones((16, 128), jnp.float32)))
  assert np.isnan(np.asarray(out)).all()


def test_simulator_detects_a_race_between_cores():
  """Both simulated cores write output block 0 (it is indexed by nothing but a "parallel" axis)."""

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * (pl.program_id(0) + 1).astype(jnp.float32)

  with pytest.raises(Exception, match="RACE DETECTED"), tpu_simulator(0):
    call = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
      grid=(2,),
      in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
    )
    jax.block_until_ready(call(jnp.ones((16, 128), jnp.float32)))

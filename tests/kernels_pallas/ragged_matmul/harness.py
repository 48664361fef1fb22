"""Shared pieces of the grouped-matmul tests: the case grid, inputs, the forward + VJP runner and
dtype-scaled comparisons. The generic ladder helpers (TPU simulator, export, libtpu compile) are
the quant_matmul ones."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from reslm.kernels_pallas.ragged_matmul import BlockSizes, ragged_matmul, reference
from tests.kernels_pallas.quant_matmul.harness import (  # noqa: F401 (re-exported)
  TRITON_CALL,
  compile_for_tpu,
  export_text,
  has_libtpu,
  races_found,
  tpu_simulator,
)

# Max error relative to max(1, max |expected|): float32 sums exact products in another order;
# bfloat16 rounds the outputs and gradients once (2^-8).
TOLERANCE = {"float32": 2e-5, "bfloat16": 1.5e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  k: int
  n: int
  sizes: tuple  # Rows per group; M may exceed their sum.
  m: int
  tpu_blocks: BlockSizes | None
  gpu_blocks: BlockSizes | None

  def __str__(self):
    return self.name


CASES = {
  c.name: c
  for c in (
    # Boundaries inside tiles, an empty group, a 1-row group, 6 rows past the last group, every
    # dim padded on TPU (K = 200, N = 136 vs 128-wide tiles).
    Case("ragged_empty_tail", 200, 136, (13, 0, 30, 1, 20), 70, BlockSizes(16, 128, 128), BlockSizes(16, 64, 64)),
    # Empty first and last groups, several row tiles per group, two N tiles, K one full tile.
    Case("empty_ends_two_n_tiles", 64, 256, (0, 40, 7, 0, 49, 0), 96, BlockSizes(32, 128, 128), BlockSizes(32, 32, 128)),
    # One group owning every row, default tiles.
    Case("single_group_defaults", 128, 128, (48,), 48, None, None),
    # No rows in any group: zeros out, zero gradients.
    Case("all_groups_empty", 32, 128, (0, 0, 0), 20, BlockSizes(16, 128, 128), BlockSizes(16, 32, 64)),
  )
}  # fmt: skip


def inputs(case: Case, dtype: str, seed: int = 0):
  """((lhs, rhs), group_sizes, d_out)."""
  keys = jax.random.split(jax.random.key(seed), 3)
  g = len(case.sizes)
  lhs = jax.random.normal(keys[0], (case.m, case.k), jnp.float32).astype(dtype)
  rhs = jax.random.normal(keys[1], (g, case.k, case.n), jnp.float32).astype(dtype)
  d_out = jax.random.normal(keys[2], (case.m, case.n), jnp.float32).astype(dtype)
  return (lhs, rhs), jnp.asarray(case.sizes, jnp.int32), d_out


def runner(fn):
  """jit(args, sizes, d_out) -> (out, (d lhs, d rhs)) for fn(lhs, rhs, sizes)."""

  @jax.jit
  def run(args, sizes, d_out):
    out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), *args)
    return out, vjp(d_out)

  return run


def kernel_runner(implementation: str, interpret, blocks):
  return runner(
    lambda a, b, s: ragged_matmul(
      a, b, s, block_sizes=blocks, implementation=implementation, interpret=interpret
    )
  )


def reference_results(case: Case, dtype: str):
  """`jax.lax.ragged_dot` in float32 HIGHEST on the upcast inputs."""
  (lhs, rhs), sizes, d_out = inputs(case, dtype)
  up = lambda a: a.astype(jnp.float32)
  return runner(reference)((up(lhs), up(rhs)), sizes, up(d_out))


def assert_close(got, want, dtype: str, what: str = ""):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  assert np.isfinite(got).all(), f"{what}: non-finite values"
  tol = TOLERANCE[dtype] * max(1.0, float(np.abs(want).max(initial=0.0)))
  np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=what)

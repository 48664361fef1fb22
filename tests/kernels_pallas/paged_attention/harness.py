"""Shared pieces of the paged-attention tests: the case grid, a paged cache with garbage outside
the used slots, the runner and comparisons. The generic ladder helpers (TPU simulator, export,
libtpu compile) are the quant_matmul ones."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from reslm.kernels_pallas.paged_attention import BlockSizes, paged_attention, reference
from tests.kernels_pallas.quant_matmul.harness import (  # noqa: F401 (re-exported)
  TRITON_CALL,
  compile_for_tpu,
  export_text,
  has_libtpu,
  races_found,
  tpu_simulator,
)

# Max error relative to max(1, max |expected|): float32 reorders exact sums (online softmax);
# bfloat16 feeds bf16 q, k, v and the bf16-rounded probabilities to the dots.
TOLERANCE = {"float32": 2e-5, "bfloat16": 1.5e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  heads: int
  kv_heads: int
  head_dim: int
  page_size: int
  pages_per_seq: int
  lengths: tuple
  int8: bool
  tpu_blocks: BlockSizes | None
  gpu_blocks: BlockSizes | None

  def __str__(self):
    return self.name


CASES = {
  c.name: c
  for c in (
    # GQA 4:1, a partial last page, an empty sequence, a full one; TPU: 3 DMA rounds of 2 pages
    # (the last half used), GPU: one page per step.
    Case("gqa4_ragged_lengths", 8, 2, 64, 16, 5, (37, 0, 80), False, BlockSizes(2), BlockSizes(1)),
    # MHA (group 1), one-token and page-boundary lengths, float32-sized pages of 8 tokens.
    Case("mha_short_pages", 4, 4, 32, 8, 3, (1, 8, 9), False, BlockSizes(1), None),
    # MQA with int8 pages and per-token scales; default blocks (one DMA round on TPU).
    Case("mqa_int8_defaults", 4, 1, 128, 32, 4, (100, 33), True, None, None),
  )
}  # fmt: skip

NUM_PAGES = 24


def inputs(case: Case, dtype: str, seed: int = 0, poison: float = 1e4):
  """(q, k_pages, v_pages, lengths, block_tables, k_scale, v_scale) for the case.

  Pages are a random permutation of the pool; every slot not holding one of a sequence's tokens
  (unused pages and the tail of a last page) holds `poison`, and block-table entries past a
  sequence's pages are -1 or out of range, so a kernel that reads them shows it.
  """
  b = len(case.lengths)
  keys = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(keys[0], (b, case.heads, case.head_dim), jnp.float32).astype(dtype)
  shape = (case.kv_heads, NUM_PAGES, case.page_size, case.head_dim)
  perm = np.asarray(jax.random.permutation(keys[3], NUM_PAGES))[: b * case.pages_per_seq]
  tables = perm.reshape(b, case.pages_per_seq).astype(np.int32)
  used = np.zeros((NUM_PAGES, case.page_size), bool)
  for s, length in enumerate(case.lengths):
    for t in range(length):
      used[tables[s, t // case.page_size], t % case.page_size] = True
    n_pages = -(-length // case.page_size)
    tables[s, n_pages:] = [-1, 10**6][s % 2]
  used = jnp.asarray(used)[None, :, :, None]

  def pool(key):
    if case.int8:
      x = jax.random.randint(key, shape, -127, 128).astype(jnp.int8)
      return jnp.where(used, x, jnp.int8(127))
    x = jax.random.normal(key, shape, jnp.float32)
    return jnp.where(used, x, poison).astype(dtype)

  k_pages, v_pages = pool(keys[1]), pool(keys[2])
  k_scale = v_scale = None
  if case.int8:
    scale_shape = shape[:3]
    k_scale = jax.random.uniform(keys[4], scale_shape, jnp.float32, 0.5, 1.5) / 127
    v_scale = jax.random.uniform(keys[5], scale_shape, jnp.float32, 0.5, 1.5) / 127
    k_scale = jnp.where(used[..., 0], k_scale, poison)
    v_scale = jnp.where(used[..., 0], v_scale, poison)
  lengths = jnp.asarray(case.lengths, jnp.int32)
  return q, k_pages, v_pages, lengths, jnp.asarray(tables), k_scale, v_scale


def run(args, *, implementation, interpret=False, blocks=None):
  q, k, v, lengths, tables, ks, vs = args
  fn = jax.jit(
    lambda *a: paged_attention(
      *a[:5], k_scale=a[5], v_scale=a[6], block_sizes=blocks, implementation=implementation,
      interpret=interpret,
    )
  )  # fmt: skip
  return fn, jax.block_until_ready(fn(q, k, v, lengths, tables, ks, vs))


def reference_result(case: Case, dtype: str):
  """The float32 reference on the upcast inputs (the valid slots only matter)."""
  q, k, v, lengths, tables, ks, vs = inputs(case, dtype)
  up = lambda a: a if case.int8 else a.astype(jnp.float32)
  return reference(
    q.astype(jnp.float32), up(k), up(v), lengths, jnp.clip(tables, 0, NUM_PAGES - 1),
    k_scale=ks, v_scale=vs,
  )  # fmt: skip


def assert_close(got, want, dtype: str, what: str = ""):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  assert np.isfinite(got).all(), f"{what}: non-finite values"
  tol = TOLERANCE[dtype] * max(1.0, float(np.abs(want).max(initial=0.0)))
  np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=what)

"""The public function's contract: one-line errors before lowering, the visit list, tile choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reslm.kernels_pallas.ragged_matmul import BlockSizes, ragged_matmul
from reslm.kernels_pallas.ragged_matmul.tpu import visits

M, K, N, G = 20, 128, 128, 3
LHS, RHS = jnp.ones((M, K)), jnp.ones((G, K, N))
SIZES = jnp.array([5, 0, 10], jnp.int32)


def _call(**kw):
  args = dict(lhs=LHS, rhs=RHS, group_sizes=SIZES)
  args.update({k: kw.pop(k) for k in list(kw) if k in args})
  return ragged_matmul(args["lhs"], args["rhs"], args["group_sizes"], **kw)


@pytest.mark.parametrize(
  ("overrides", "match"),
  [
    (dict(lhs=jnp.ones((M, K, 1))), "lhs must be"),
    (dict(rhs=jnp.ones((G, K + 1, N))), "does not match"),
    (dict(lhs=jnp.ones((M, K), jnp.float16)), "dtype float16"),
    (dict(rhs=RHS.astype(jnp.bfloat16)), "share one dtype"),
    (dict(group_sizes=jnp.ones((G + 1,), jnp.int32)), "group_sizes"),
    (dict(group_sizes=jnp.ones((G,), jnp.float32)), "integer"),
    (dict(lhs=jnp.ones((0, K))), "positive"),
    (dict(implementation="megablox"), "implementation='megablox'"),
    (dict(implementation="tpu", block_sizes=BlockSizes(block_m=8)), "block_m=8"),
    (
      dict(implementation="tpu", block_sizes=BlockSizes(block_n=64), rhs=jnp.ones((G, K, 256))),
      "block_n=64",
    ),
    (dict(implementation="gpu", block_sizes=BlockSizes(block_k=48)), "block_k=48"),
  ],
)
def test_bad_arguments_raise_one_line_errors(overrides, match):
  with pytest.raises(ValueError, match=match) as err:
    _call(**overrides)
  assert "\n" not in str(err.value) and str(err.value).startswith("ragged_matmul: ")


def test_block_sizes_must_be_positive_ints():
  with pytest.raises(ValueError, match=r"block_sizes.block_m=0"):
    BlockSizes(block_m=0)


def test_visit_list_covers_every_row_once():
  """Forward visits: (group, tile, rows) in order, each row of every tile in exactly one visit,
  padding entries repeat the last; d rhs visits give every group (even an empty one) a visit."""
  sizes = jnp.array([3, 0, 9, 1, 0], jnp.int32)  # Sum 13 of M = 20 rows; tiles of 4.
  meta, num = jax.jit(visits, static_argnames=("m", "block_m", "num_tiles", "tail"))(
    sizes, m=20, block_m=4, num_tiles=5, tail=True
  )
  meta, num = np.asarray(meta), int(num[0])
  g, tile, lo, hi = meta
  assert meta.shape == (4, 5 + 5) and num <= 10
  owner = np.full(20, -1)
  for v in range(num):
    assert tile[v] * 4 <= lo[v] < hi[v] <= tile[v] * 4 + 4
    assert (owner[lo[v] : hi[v]] == -1).all()
    owner[lo[v] : hi[v]] = g[v]
  np.testing.assert_array_equal(owner, [0] * 3 + [2] * 9 + [3] + [5] * 7)  # 5 = virtual tail.
  assert (np.diff(tile[:num]) >= 0).all() and (meta[:, num:] == meta[:, num - 1 : num]).all()
  meta, num = visits(sizes, m=20, block_m=4, num_tiles=5, tail=False)
  assert sorted(set(np.asarray(meta[0, : int(num[0])]).tolist())) == [0, 1, 2, 3, 4]


def test_sizes_beyond_m_are_clipped_and_rows_past_the_groups_are_zero():
  lhs = jax.random.normal(jax.random.key(0), (M, K))
  rhs = jax.random.normal(jax.random.key(1), (G, K, N))
  out = ragged_matmul(lhs, rhs, jnp.array([4, 4, 4], jnp.int32), implementation="reference")
  np.testing.assert_array_equal(np.asarray(out[12:]), 0)
  np.testing.assert_allclose(out[:4], lhs[:4] @ rhs[0], rtol=1e-5, atol=1e-4)
  big = ragged_matmul(
    lhs, rhs, jnp.array([4, 4, 100], jnp.int32), implementation="tpu", interpret=True
  )
  np.testing.assert_allclose(big[8:], lhs[8:] @ rhs[2], rtol=1e-5, atol=1e-4)

"""Grouped (ragged) matmul for TPU as Pallas (Mosaic) kernels, forward and both gradients.

Visits. lhs rows are cut into tiles of block_m rows; a tile that holds rows of several groups is
visited once per group, in order, so a "visit" is a (group, tile, row range) triple. The list is
built in XLA from group_sizes, padded to the static bound tiles + G, and scalar-prefetched to SMEM
together with the true visit count; index maps read it to pick the lhs tile and the group's rhs
block, so the grid is static and padding visits re-address the last real visit's blocks (no DMA,
no write).

  forward  grid (N tiles, visits, K tiles), K last: acc += lhs_tile · rhs[g] (float32 VMEM
           scratch); at the last K step the rows of the visit's range are written into the output
           tile, which stays resident while consecutive visits of the same tile fill in their rows.
           A virtual group after the last one covers rows past sum(group_sizes), so every output
           row is written (zeros there). Other groups' rows of the tile are never stored, so a NaN
           in one group's tokens cannot reach another group's output.
  d lhs    the same kernel on (d out, rhs[g]ᵀ).
  d rhs    grid (K tiles, N tiles, visits), visits last: acc += lhs_tileᵀ · dout_tile with both
           masked to the visit's rows (select, so NaN elsewhere cannot leak), written to rhs block
           g at the group's last visit. Empty groups get one visit with no rows: zeros.

Numerics: bfloat16 feeds the MXU with float32 accumulation; float32 uses `Precision.HIGHEST`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from reslm.kernels_pallas import base
from reslm.kernels_pallas.ragged_matmul.config import RaggedConfig, error, tpu_tiles
from reslm.kernels_pallas.ragged_matmul.reference import group_bounds

_F32 = jnp.float32
_VMEM_DEFAULT = 12 * 2**20
_VMEM_MAX = 64 * 2**20


def _interpret(cfg: RaggedConfig):
  if isinstance(cfg.interpret, bool | pltpu.InterpretParams):
    return cfg.interpret
  raise error(
    f"interpret={cfg.interpret!r} is not usable by the TPU kernel; pass a bool or a "
    "pltpu.InterpretParams"
  )


def _params(semantics, vmem_bytes: int) -> pltpu.CompilerParams:
  limit = min(int(vmem_bytes * 1.5), _VMEM_MAX) if vmem_bytes > _VMEM_DEFAULT else None
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _pad(a, *shape):
  pads = [(0, s - d) for s, d in zip(shape, a.shape, strict=True)]
  return jnp.pad(a, pads) if any(p for _, p in pads) else a


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == _F32 else None


def visits(group_sizes, *, m: int, block_m: int, num_tiles: int, tail: bool):
  """The visit list: (meta int32 [4, tiles + G] = group, tile, row lo, row hi; count int32 [1]).

  tail=True (forward): a virtual group G covers rows [sum, tiles * block_m), so every tile is
  visited. tail=False (d rhs): every group gets at least one visit (an empty one has lo >= hi).
  Entries past the count repeat the last visit.
  """
  starts, ends = group_bounds(group_sizes, m)
  groups = starts.shape[0]
  if tail:
    starts = jnp.append(starts, ends[-1])
    ends = jnp.append(ends, num_tiles * block_m)
  sizes = ends - starts
  first = lax.div(starts, block_m)
  count = jnp.where(
    sizes > 0, lax.div(jnp.maximum(ends - 1, 0), block_m) - first + 1, 0 if tail else 1
  )
  cum = jnp.cumsum(count)
  total = cum[-1]
  t = jnp.minimum(jnp.arange(num_tiles + groups, dtype=jnp.int32), total - 1)
  g = jnp.searchsorted(cum, t, side="right").astype(jnp.int32)
  tile = jnp.clip(first[g] + t - (cum[g] - count[g]), 0, num_tiles - 1)
  lo = jnp.maximum(starts[g], tile * block_m)
  hi = jnp.minimum(ends[g], tile * block_m + block_m)
  return jnp.stack([g, tile, lo, hi]).astype(jnp.int32), total.reshape(1).astype(jnp.int32)


def max_visits(cfg: RaggedConfig, num_tiles: int) -> int:
  """Visits that compute, at most: each group boundary inside a tile adds one visit to the tiles.

  The cost estimates use this bound, which is reached whenever no boundary falls on a tile edge
  (the usual case with learned routing); a visit runs a whole (block_m x K x N) tile product.
  """
  return num_tiles + min(cfg.groups, cfg.m) - 1


def _row_mask(tile, lo, hi, shape):
  rows = tile * shape[0] + lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= lo) & (rows < hi)


def _gmm_kernel(meta, num, x_ref, w_ref, o_ref, acc_ref, *, groups, nk, transpose_rhs):
  t, kk = pl.program_id(1), pl.program_id(2)
  valid = t < num[0]
  g, tile, lo, hi = meta[0, t], meta[1, t], meta[2, t], meta[3, t]

  @pl.when(kk == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, _F32)

  @pl.when(valid & (g < groups) & (lo < hi))
  def _accumulate():
    x = x_ref[...]
    contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
    acc_ref[...] += lax.dot_general(
      x,
      w_ref[...],
      (contract, ((), ())),
      precision=_precision(x.dtype),
      preferred_element_type=_F32,
    )

  last_k = valid & (kk == nk - 1)
  first_visit = (t == 0) | (meta[1, jnp.maximum(t - 1, 0)] != tile)
  mask = _row_mask(tile, lo, hi, o_ref.shape)

  @pl.when(last_k & first_visit)
  def _store_first():  # The tile's buffer holds nothing yet: rows of later visits start at 0.
    o_ref[...] = jnp.where(mask, acc_ref[...], 0.0).astype(o_ref.dtype)

  @pl.when(last_k & jnp.logical_not(first_visit))
  def _store_more():
    o_ref[...] = jnp.where(mask, acc_ref[...].astype(o_ref.dtype), o_ref[...])


def gmm(cfg: RaggedConfig, lhs, rhs, group_sizes, *, transpose_rhs: bool = False):
  """lhs [M, Q] times rhs[g] ([G, Q, P], or [G, P, Q] with transpose_rhs) per row group."""
  t = tpu_tiles(cfg)
  # Forward: Q = K, P = N. d lhs: Q = N, P = K (the same tiles, roles swapped).
  (bq, q), (bp, p) = (
    ((t.block_n, t.n), (t.block_k, t.k)) if transpose_rhs else ((t.block_k, t.k), (t.block_n, t.n))
  )
  bm, num_tiles = t.block_m, t.m // t.block_m
  meta, num = visits(group_sizes, m=cfg.m, block_m=bm, num_tiles=num_tiles, tail=True)
  nv, groups = meta.shape[1], cfg.groups
  x = _pad(lhs, t.m, q)
  if transpose_rhs:
    w = _pad(rhs, groups, p, q)
    w_spec = pl.BlockSpec(
      (None, bp, bq), lambda n, v, k, meta, num: (jnp.minimum(meta[0, v], groups - 1), n, k)
    )
  else:
    w = _pad(rhs, groups, q, p)
    w_spec = pl.BlockSpec(
      (None, bq, bp), lambda n, v, k, meta, num: (jnp.minimum(meta[0, v], groups - 1), k, n)
    )
  grid = (p // bp, nv, q // bq)
  item = x.dtype.itemsize
  vmem = 2 * (bm * bq + bq * bp + bm * bp) * item + bm * bp * 4
  # K is the innermost grid axis, so each visit fetches its K strip of lhs and of its group's rhs
  # again (with a single K tile consecutive visits keep the lhs tile or the rhs block resident).
  nvis = max_visits(cfg, num_tiles)
  if grid[2] > 1:
    x_bytes, w_bytes = nvis * bm * q * item * grid[0], nvis * q * p * item
  else:
    x_bytes, w_bytes = x.size * item * grid[0], min(groups, nvis) * q * p * item
  cost = pl.CostEstimate(
    flops=2 * nvis * bm * q * p,
    transcendentals=0,
    bytes_accessed=int(x_bytes + w_bytes + t.m * p * item),
  )
  out = base.pallas_call(
    functools.partial(_gmm_kernel, groups=groups, nk=grid[2], transpose_rhs=transpose_rhs),
    out_shape=jax.ShapeDtypeStruct((t.m, p), lhs.dtype),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=grid,
      in_specs=[pl.BlockSpec((bm, bq), lambda n, v, k, meta, num: (meta[1, v], k)), w_spec],
      out_specs=pl.BlockSpec((bm, bp), lambda n, v, k, meta, num: (meta[1, v], n)),
      scratch_shapes=[pltpu.VMEM((bm, bp), _F32)],
    ),
    compiler_params=_params(("parallel", "arbitrary", "arbitrary"), vmem),
    cost_estimate=cost,
    interpret=_interpret(cfg),
    name="ragged_matmul_dlhs" if transpose_rhs else "ragged_matmul",
  )(meta, num, x, w)
  return out[: cfg.m, : (cfg.k if transpose_rhs else cfg.n)]


def _tgmm_kernel(meta, num, x_ref, d_ref, o_ref, acc_ref, *, num_visits):
  t = pl.program_id(2)
  valid = t < num[0]
  g, tile, lo, hi = meta[0, t], meta[1, t], meta[2, t], meta[3, t]
  first = (t == 0) | (meta[0, jnp.maximum(t - 1, 0)] != g)
  last = (t == num[0] - 1) | (meta[0, jnp.minimum(t + 1, num_visits - 1)] != g)

  @pl.when(valid & first)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, _F32)

  @pl.when(valid & (lo < hi))
  def _accumulate():
    x = jnp.where(_row_mask(tile, lo, hi, x_ref.shape), x_ref[...], 0)
    d = jnp.where(_row_mask(tile, lo, hi, d_ref.shape), d_ref[...], 0)
    acc_ref[...] += lax.dot_general(
      x, d, (((0,), (0,)), ((), ())), precision=_precision(x.dtype), preferred_element_type=_F32
    )

  @pl.when(valid & last)
  def _store():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tgmm(cfg: RaggedConfig, lhs, d_out, group_sizes):
  """d rhs [G, K, N]: per group g, lhs_gᵀ · d_out_g (zeros for an empty group)."""
  t = tpu_tiles(cfg)
  bm, bk, bn = t.block_m, t.block_k, t.block_n
  num_tiles = t.m // bm
  meta, num = visits(group_sizes, m=cfg.m, block_m=bm, num_tiles=num_tiles, tail=False)
  nv = meta.shape[1]
  x, d = _pad(lhs, t.m, t.k), _pad(d_out, t.m, t.n)
  grid = (t.k // bk, t.n // bn, nv)
  item = x.dtype.itemsize
  vmem = 2 * (bm * bk + bm * bn + bk * bn) * item + bk * bn * 4
  cost = pl.CostEstimate(
    flops=2 * max_visits(cfg, num_tiles) * bm * t.k * t.n,  # Whole tiles, rows masked.
    transcendentals=0,
    bytes_accessed=int(
      x.size * item * grid[1] + d.size * item * grid[0] + cfg.groups * t.k * t.n * item
    ),
  )
  out = base.pallas_call(
    functools.partial(_tgmm_kernel, num_visits=nv),
    out_shape=jax.ShapeDtypeStruct((cfg.groups, t.k, t.n), lhs.dtype),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=grid,
      in_specs=[
        pl.BlockSpec((bm, bk), lambda k, n, v, meta, num: (meta[1, v], k)),
        pl.BlockSpec((bm, bn), lambda k, n, v, meta, num: (meta[1, v], n)),
      ],
      out_specs=pl.BlockSpec((None, bk, bn), lambda k, n, v, meta, num: (meta[0, v], k, n)),
      scratch_shapes=[pltpu.VMEM((bk, bn), _F32)],
    ),
    compiler_params=_params(("parallel", "parallel", "arbitrary"), vmem),
    cost_estimate=cost,
    interpret=_interpret(cfg),
    name="ragged_matmul_drhs",
  )(meta, num, x, d)
  return out[:, : cfg.k, : cfg.n]


def forward(cfg: RaggedConfig, lhs, rhs, group_sizes):
  return gmm(cfg, lhs, rhs, group_sizes)


def backward(cfg: RaggedConfig, lhs, rhs, group_sizes, d_out):
  """(d lhs, d rhs)."""
  return gmm(cfg, d_out, rhs, group_sizes, transpose_rhs=True), tgmm(cfg, lhs, d_out, group_sizes)

"""Grouped (ragged) matmul for NVIDIA GPUs as Pallas Triton kernels, forward and both gradients.

Why Triton (see also `kernels_pallas/quant_matmul/gpu.py`): group boundaries fall anywhere inside a
tile, which Triton handles with per-row masks and data-dependent loop bounds read from small int32
arrays (Triton has no scalar prefetch); the kernels run in the same Pallas interpreter as the TPU
ones and export for CUDA from a CPU host. The backend is deprecated since jax 0.11 (it warns); a
Mosaic GPU port is future work.

  forward  grid (M tiles, N tiles): a program loops over the groups that intersect its row tile
           (range precomputed in XLA), each over K: acc_g = Σ_k (rows of g, others zeroed) · rhs[g],
           and keeps acc_g on g's rows only. Rows past the last group stay zero.
  d lhs    the same kernel on (d out, rhs[g]ᵀ).
  d rhs    grid (G, K tiles, N tiles): a program loops over its group's rows in chunks of block_m
           (dynamic start, rows outside the group zeroed): lhs_gᵀ · dout_g. Empty groups: zeros.
Rows of other groups are zeroed with a select before every dot, so a NaN cannot leak across groups.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from reslm.kernels_pallas import base
from reslm.kernels_pallas.ragged_matmul.config import RaggedConfig, error, gpu_tiles
from reslm.kernels_pallas.ragged_matmul.reference import group_bounds

_F32 = jnp.float32
_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)


def _interpret(cfg: RaggedConfig) -> bool:
  if isinstance(cfg.interpret, bool):
    return cfg.interpret
  raise error(f"interpret={cfg.interpret!r} is not usable by the GPU kernel; pass a bool")


def _pad(a, *shape):
  pads = [(0, s - d) for s, d in zip(shape, a.shape, strict=True)]
  return jnp.pad(a, pads) if any(p for _, p in pads) else a


def _gmm_kernel(starts, ends, first, last, x_ref, w_ref, o_ref, *, nq, bq, transpose_rhs):
  i = pl.program_id(0)
  bm, bp = o_ref.shape
  rows = i * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)

  def group(g, out):
    mask = (rows >= starts[g]) & (rows < ends[g])

    def step(kk, acc):
      x = jnp.where(mask, x_ref[:, pl.ds(kk * bq, bq)], 0)
      if transpose_rhs:
        w = w_ref[g, :, pl.ds(kk * bq, bq)]
        contract = ((1,), (1,))
      else:
        w = w_ref[g, pl.ds(kk * bq, bq), :]
        contract = ((1,), (0,))
      return acc + lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=_F32)

    acc = lax.fori_loop(0, nq, step, jnp.zeros((bm, bp), _F32))
    return jnp.where(mask, acc, out)

  out = lax.fori_loop(first[i], last[i] + 1, group, jnp.zeros((bm, bp), _F32))
  o_ref[...] = out.astype(o_ref.dtype)


def gmm(cfg: RaggedConfig, lhs, rhs, group_sizes, *, transpose_rhs: bool = False):
  """lhs [M, Q] times rhs[g] ([G, Q, P], or [G, P, Q] with transpose_rhs) per row group."""
  t = gpu_tiles(cfg)
  (bq, q), (bp, p) = (
    ((t.block_n, t.n), (t.block_k, t.k)) if transpose_rhs else ((t.block_k, t.k), (t.block_n, t.n))
  )
  bm, num_tiles, groups = t.block_m, t.m // t.block_m, cfg.groups
  starts, ends = group_bounds(group_sizes, cfg.m)
  tile_start = jnp.arange(num_tiles, dtype=jnp.int32) * bm
  # Groups g0..g1 (inclusive) may own rows of the tile: ends[g] > start and starts[g] < end.
  first = jnp.searchsorted(ends, tile_start, side="right").astype(jnp.int32)
  last = (jnp.searchsorted(starts, tile_start + bm, side="left") - 1).astype(jnp.int32)
  x = _pad(lhs, t.m, q)
  if transpose_rhs:
    w = _pad(rhs, groups, p, q)
    w_spec = pl.BlockSpec((groups, bp, q), lambda i, j: (0, j, 0))
  else:
    w = _pad(rhs, groups, q, p)
    w_spec = pl.BlockSpec((groups, q, bp), lambda i, j: (0, 0, j))
  meta_spec = lambda n: pl.BlockSpec((n,), lambda i, j: (0,))
  item = x.dtype.itemsize
  out = base.pallas_call(
    functools.partial(_gmm_kernel, nq=q // bq, bq=bq, transpose_rhs=transpose_rhs),
    out_shape=jax.ShapeDtypeStruct((t.m, p), lhs.dtype),
    grid=(num_tiles, p // bp),
    in_specs=[
      meta_spec(groups),
      meta_spec(groups),
      meta_spec(num_tiles),
      meta_spec(num_tiles),
      pl.BlockSpec((bm, q), lambda i, j: (i, 0)),
      w_spec,
    ],
    out_specs=pl.BlockSpec((bm, bp), lambda i, j: (i, j)),
    compiler_params=_PARAMS,
    cost_estimate=pl.CostEstimate(
      flops=2 * cfg.m * q * p,
      transcendentals=0,
      bytes_accessed=int(x.size * item * (p // bp) + w.size * item + t.m * p * item),
    ),
    interpret=_interpret(cfg),
    name="ragged_matmul_dlhs" if transpose_rhs else "ragged_matmul",
  )(starts, ends, first, last, x, w)
  return out[: cfg.m, : (cfg.k if transpose_rhs else cfg.n)]


def _tgmm_kernel(starts, ends, x_ref, d_ref, o_ref, *, bm):
  g = pl.program_id(0)
  lo, hi = starts[g], ends[g]
  rows = lax.broadcasted_iota(jnp.int32, (bm, 1), 0)

  def step(c, acc):
    r0 = lo + c * bm
    mask = r0 + rows < hi
    x = jnp.where(mask, x_ref[pl.ds(r0, bm), :], 0)
    d = jnp.where(mask, d_ref[pl.ds(r0, bm), :], 0)
    return acc + lax.dot_general(x, d, (((0,), (0,)), ((), ())), preferred_element_type=_F32)

  chunks = lax.div(hi - lo + bm - 1, bm)
  o_ref[...] = lax.fori_loop(0, chunks, step, jnp.zeros(o_ref.shape, _F32)).astype(o_ref.dtype)


def tgmm(cfg: RaggedConfig, lhs, d_out, group_sizes):
  """d rhs [G, K, N]: per group g, lhs_gᵀ · d_out_g (zeros for an empty group)."""
  t = gpu_tiles(cfg)
  bm, bk, bn, groups = t.block_m, t.block_k, t.block_n, cfg.groups
  starts, ends = group_bounds(group_sizes, cfg.m)
  rows = t.m + bm  # A chunk starting at a group's last row may run bm - 1 rows past M.
  x, d = _pad(lhs, rows, t.k), _pad(d_out, rows, t.n)
  item = x.dtype.itemsize
  out = base.pallas_call(
    functools.partial(_tgmm_kernel, bm=bm),
    out_shape=jax.ShapeDtypeStruct((groups, t.k, t.n), lhs.dtype),
    grid=(groups, t.k // bk, t.n // bn),
    in_specs=[
      pl.BlockSpec((groups,), lambda g, k, n: (0,)),
      pl.BlockSpec((groups,), lambda g, k, n: (0,)),
      pl.BlockSpec((rows, bk), lambda g, k, n: (0, k)),
      pl.BlockSpec((rows, bn), lambda g, k, n: (0, n)),
    ],
    out_specs=pl.BlockSpec((None, bk, bn), lambda g, k, n: (g, k, n)),
    compiler_params=_PARAMS,
    cost_estimate=pl.CostEstimate(
      flops=2 * cfg.m * cfg.k * cfg.n,
      transcendentals=0,
      bytes_accessed=int(
        x.size * item * (t.n // bn) + d.size * item * (t.k // bk) + groups * t.k * t.n * item
      ),
    ),
    interpret=_interpret(cfg),
    name="ragged_matmul_drhs",
  )(starts, ends, x, d)
  return out[:, : cfg.k, : cfg.n]


def forward(cfg: RaggedConfig, lhs, rhs, group_sizes):
  return gmm(cfg, lhs, rhs, group_sizes)


def backward(cfg: RaggedConfig, lhs, rhs, group_sizes, d_out):
  """(d lhs, d rhs)."""
  return gmm(cfg, d_out, rhs, group_sizes, transpose_rhs=True), tgmm(cfg, lhs, d_out, group_sizes)

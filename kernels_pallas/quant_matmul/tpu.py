"""Low-bit matmuls for TPU as Pallas (Mosaic) kernels.

Forward, grid (M tiles, N tiles, K tiles) with K last ("arbitrary", the rest "parallel"), a float32
(int32 for int8 x int8) accumulator tile in VMEM scratch:
  int8:       acc += x · w_q  (int8 -> x's dtype is exact), out = acc * scale[n] at the last K step;
  int4:       x is split into its even and odd K columns in XLA (the packing puts K rows 2r and
              2r + 1 in one byte), the packed tile is unpacked by arithmetic shifts, and each
              group's float32 partial product is scaled before it is added:
              acc += (x_even_g · lo_g + x_odd_g · hi_g) * scale[g, n];
  int8_int8:  acc += x_q · w_q in int32 on the int8 MXU (v5e and later), out = acc * xs[m] * ws[n].
Group scales are laid out [K / g, 1, N] so a tile of them is a (groups, 1, block_n) block whatever
the group count (the last two block dims are then (1, full) and (lanes)).

Backward (gradient w.r.t. x, weights frozen), grid (M tiles, K tiles, N tiles) with N reduced:
  int8:  dx = (g * scale) · w_qᵀ (g pre-scaled in XLA);
  int4:  dx_even = g · (lo ∘ s)ᵀ, dx_odd = g · (hi ∘ s)ᵀ with the group scales broadcast to the
         tile's packed rows, then re-interleaved in XLA. A scale that varies along the reduced axis
         cannot be applied after the dot, so here the weights are dequantized first (in g's dtype).

Numerics: bfloat16 x feeds the MXU as bfloat16 with float32 accumulation (int4 and int8 values are
exact in bfloat16); float32 x uses `Precision.HIGHEST`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from reslm.kernels_pallas import base
from reslm.kernels_pallas.quant_matmul.config import QuantConfig, Tiles, error, tpu_tiles

_F32 = jnp.float32
_VMEM_DEFAULT = 12 * 2**20  # Below the smallest default scoped-VMEM limit (16 MiB).
_VMEM_MAX = 64 * 2**20


def _interpret(cfg: QuantConfig):
  if isinstance(cfg.interpret, bool | pltpu.InterpretParams):
    return cfg.interpret
  raise error(
    f"interpret={cfg.interpret!r} is not usable by the TPU kernel; pass a bool or a "
    "pltpu.InterpretParams"
  )


def _params(semantics, vmem_bytes: int) -> pltpu.CompilerParams:
  limit = min(int(vmem_bytes * 1.5), _VMEM_MAX) if vmem_bytes > _VMEM_DEFAULT else None
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == _F32 else None


def _pad(a, *shape):
  pads = [(0, s - d) for s, d in zip(shape, a.shape, strict=True)]
  return jnp.pad(a, pads) if any(p for _, p in pads) else a


def _nbytes(*arrays) -> int:
  return sum(a.size * a.dtype.itemsize for a in arrays)


def unpack_tile(packed, dtype):
  """A packed int4 tile -> (even rows, odd rows) in `dtype` (int4 values are exact in bf16)."""
  p = packed.astype(jnp.int32)
  lo = ((p << 28) >> 28).astype(_F32)
  hi = ((p << 24) >> 28).astype(_F32)
  return lo.astype(dtype), hi.astype(dtype)


# --------------------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, kind: str, nk: int, group: int, has_scales: bool):
  if kind == "int4":
    xe_ref, xo_ref, w_ref, s_ref, o_ref, acc_ref = refs
  elif kind == "int8":
    x_ref, w_ref, s_ref, o_ref, acc_ref = refs
  elif has_scales:
    x_ref, w_ref, xs_ref, ws_ref, o_ref, acc_ref = refs
  else:
    x_ref, w_ref, o_ref, acc_ref = refs
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

  if kind == "int8_int8":
    acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.int32)
  elif kind == "int8":
    x = x_ref[...]
    acc_ref[...] += jnp.dot(
      x, w_ref[...].astype(x.dtype), precision=_precision(x.dtype), preferred_element_type=_F32
    )
  else:
    dtype = xe_ref.dtype
    lo, hi = unpack_tile(w_ref[...], dtype)
    half = group // 2  # Packed rows (and x columns of each parity) per group.
    acc = acc_ref[...]
    for gi in range(w_ref.shape[0] // half):
      rows = slice(gi * half, (gi + 1) * half)
      part = jnp.dot(
        xe_ref[:, rows], lo[rows], precision=_precision(dtype), preferred_element_type=_F32
      )
      part += jnp.dot(
        xo_ref[:, rows], hi[rows], precision=_precision(dtype), preferred_element_type=_F32
      )
      acc += part * s_ref[gi]  # (block_n,) scale of this group, broadcast over rows.
    acc_ref[...] = acc

  @pl.when(k == nk - 1)
  def _finish():
    out = acc_ref[...]
    if kind == "int8":
      out = out * s_ref[...]
    elif kind == "int8_int8" and has_scales:
      out = out.astype(_F32) * xs_ref[...] * ws_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)


def matmul(cfg: QuantConfig, x, w, scales, x_scale=None):
  """The forward kernel: x [M, K] -> [M, N] in cfg.out_dtype."""
  t: Tiles = tpu_tiles(cfg)
  bm, bn, bk = t.block_m, t.block_n, t.block_k
  grid = (t.m // bm, t.n // bn, t.k // bk)
  x_spec = pl.BlockSpec((bm, bk), lambda i, j, k: (i, k))
  w_spec = pl.BlockSpec((bk, bn), lambda i, j, k: (k, j))
  row_spec = pl.BlockSpec((1, bn), lambda i, j, k: (0, j))
  if cfg.kind == "int4":
    g = cfg.group_size
    x = _pad(x, t.m, t.k)
    operands = [x[:, 0::2], x[:, 1::2], _pad(w, t.k // 2, t.n)]
    operands.append(_pad(scales.astype(_F32), t.k // g, t.n).reshape(t.k // g, 1, t.n))
    half_spec = pl.BlockSpec((bm, bk // 2), lambda i, j, k: (i, k))
    in_specs = [half_spec, half_spec, pl.BlockSpec((bk // 2, bn), lambda i, j, k: (k, j))]
    in_specs.append(pl.BlockSpec((bk // g, 1, bn), lambda i, j, k: (k, 0, j)))
  else:
    operands, in_specs = [_pad(x, t.m, t.k), _pad(w, t.k, t.n)], [x_spec, w_spec]
    if cfg.kind == "int8":
      operands.append(_pad(scales.astype(_F32).reshape(1, -1), 1, t.n))
      in_specs.append(row_spec)
    elif cfg.has_scales:
      operands.append(_pad(x_scale.astype(_F32).reshape(-1, 1), t.m, 1))
      operands.append(_pad(scales.astype(_F32).reshape(1, -1), 1, t.n))
      in_specs += [pl.BlockSpec((bm, 1), lambda i, j, k: (i, 0)), row_spec]
  acc_dtype = jnp.int32 if cfg.kind == "int8_int8" else _F32
  out_dtype = jnp.dtype(cfg.out_dtype)
  x_item, w_item = operands[0].dtype.itemsize, 1
  vmem = 2 * (bm * bk * x_item + bk * bn * w_item + bm * bn * out_dtype.itemsize) + 3 * bm * bn * 4
  x_bytes = _nbytes(*operands[: 2 if cfg.kind == "int4" else 1])
  w_bytes = _nbytes(*operands[2 if cfg.kind == "int4" else 1 :])
  cost = pl.CostEstimate(
    flops=2 * t.m * t.n * t.k,
    transcendentals=0,
    # x is fetched again for every N tile unless there is a single K tile (its block then stays).
    bytes_accessed=int(
      x_bytes * (grid[1] if grid[2] > 1 else 1) + w_bytes * grid[0] + t.m * t.n * out_dtype.itemsize
    ),
  )
  out = base.pallas_call(
    functools.partial(
      _fwd_kernel, kind=cfg.kind, nk=grid[2], group=cfg.group_size, has_scales=cfg.has_scales
    ),
    out_shape=jax.ShapeDtypeStruct((t.m, t.n), out_dtype),
    grid=grid,
    in_specs=in_specs,
    out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
    scratch_shapes=[pltpu.VMEM((bm, bn), acc_dtype)],
    compiler_params=_params(("parallel", "parallel", "arbitrary"), vmem),
    cost_estimate=cost,
    interpret=_interpret(cfg),
    name=f"quant_matmul_{cfg.kind}",
  )(*operands)
  return out[: cfg.m, : cfg.n]


# -------------------------------------------------------------------------------------- backward


def _dot_nt(a, b, precision):
  """a [m, r] · b [k, r]ᵀ -> [m, k] float32."""
  return lax.dot_general(
    a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=_F32
  )


def _dx_kernel(*refs, kind: str, nr: int, group: int):
  r = pl.program_id(2)
  if kind == "int8":
    g_ref, w_ref, dx_ref, acc_ref = refs
    accs = (acc_ref,)
  else:
    g_ref, w_ref, s_ref, de_ref, do_ref, acc_e, acc_o = refs
    accs = (acc_e, acc_o)

  @pl.when(r == 0)
  def _init():
    for acc in accs:
      acc[...] = jnp.zeros(acc.shape, _F32)

  g = g_ref[...]
  precision = _precision(g.dtype)
  if kind == "int8":
    acc_ref[...] += _dot_nt(g, w_ref[...].astype(g.dtype), precision)
  else:
    lo, hi = unpack_tile(w_ref[...], _F32)
    rows, bn = w_ref.shape
    # Each group's scale row, repeated over its group // 2 packed rows.
    s = jnp.broadcast_to(s_ref[...], (rows * 2 // group, group // 2, bn)).reshape(rows, bn)
    acc_e[...] += _dot_nt(g, (lo * s).astype(g.dtype), precision)
    acc_o[...] += _dot_nt(g, (hi * s).astype(g.dtype), precision)

  @pl.when(r == nr - 1)
  def _finish():
    if kind == "int8":
      dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)
    else:
      de_ref[...] = acc_e[...].astype(de_ref.dtype)
      do_ref[...] = acc_o[...].astype(do_ref.dtype)


def matmul_dx(cfg: QuantConfig, g, w, scales):
  """The gradient kernel: cotangent g [M, N] -> dx [M, K] in x's dtype (int8 and int4 only)."""
  t = tpu_tiles(cfg)
  bm, bn, bk = t.block_m, t.block_n, t.block_k
  grid = (t.m // bm, t.k // bk, t.n // bn)
  x_dtype = jnp.dtype(cfg.x_dtype)
  g_spec = pl.BlockSpec((bm, bn), lambda i, j, r: (i, r))
  if cfg.kind == "int8":
    g = (g.astype(_F32) * scales.astype(_F32)).astype(g.dtype)
    operands = [_pad(g, t.m, t.n), _pad(w, t.k, t.n)]
    in_specs = [g_spec, pl.BlockSpec((bk, bn), lambda i, j, r: (j, r))]
    out_shape = jax.ShapeDtypeStruct((t.m, t.k), x_dtype)
    out_specs = pl.BlockSpec((bm, bk), lambda i, j, r: (i, j))
    scratch = [pltpu.VMEM((bm, bk), _F32)]
  else:
    gs = cfg.group_size
    s = _pad(scales.astype(_F32), t.k // gs, t.n).reshape(t.k // gs, 1, t.n)
    operands = [_pad(g, t.m, t.n), _pad(w, t.k // 2, t.n), s]
    in_specs = [
      g_spec,
      pl.BlockSpec((bk // 2, bn), lambda i, j, r: (j, r)),
      pl.BlockSpec((bk // gs, 1, bn), lambda i, j, r: (j, 0, r)),
    ]
    out_shape = [jax.ShapeDtypeStruct((t.m, t.k // 2), x_dtype)] * 2
    out_specs = [pl.BlockSpec((bm, bk // 2), lambda i, j, r: (i, j))] * 2
    scratch = [pltpu.VMEM((bm, bk // 2), _F32)] * 2
  g_item = operands[0].dtype.itemsize
  vmem = 2 * (bm * bn * g_item + bk * bn + bm * bk * x_dtype.itemsize) + 4 * bm * bk + 4 * bk * bn
  cost = pl.CostEstimate(
    flops=2 * t.m * t.n * t.k,
    transcendentals=0,
    bytes_accessed=int(
      _nbytes(operands[0]) * (grid[1] if grid[2] > 1 else 1)
      + _nbytes(*operands[1:]) * grid[0]
      + t.m * t.k * x_dtype.itemsize
    ),
  )
  out = base.pallas_call(
    functools.partial(_dx_kernel, kind=cfg.kind, nr=grid[2], group=cfg.group_size),
    out_shape=out_shape,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    scratch_shapes=scratch,
    compiler_params=_params(("parallel", "parallel", "arbitrary"), vmem),
    cost_estimate=cost,
    interpret=_interpret(cfg),
    name=f"quant_matmul_{cfg.kind}_dx",
  )(*operands)
  if cfg.kind == "int8":
    return out[: cfg.m, : cfg.k]
  dx = jnp.stack(out, axis=-1).reshape(t.m, t.k)  # Re-interleave even and odd K columns.
  return dx[: cfg.m, : cfg.k]

"""Low-bit matmuls for NVIDIA GPUs as Pallas Triton kernels.

Why Triton and not Mosaic GPU: these kernels dequantize int8 / packed int4 tiles in registers
right before the dot and apply a scale per group of K rows, i.e. per-element integer work on the
weight operand; Triton expresses that directly (any tile shape that is a power of two, masked
loads, int8 x int8 -> int32 dots), runs in the same Pallas interpreter as the TPU kernels, and
exports for CUDA from a CPU host. The Triton backend is deprecated since jax 0.11 (it warns); the
Mosaic GPU port (weights dequantized into swizzled shared memory for wgmma) is future work.

Forward, grid (M tiles, N tiles), one program per output tile looping over K inside (Triton grid
programs are unordered, so a reduction cannot span programs):
  int8:      acc += x · w_q, out = acc * scale[n];
  int4:      acc += (x_even_g · lo_g + x_odd_g · hi_g) * scale[g, n] for each group g;
  int8_int8: acc += x_q · w_q in int32, out = acc * xs[m] * ws[n].
Backward (dx), grid (M tiles, K tiles), looping over N: dx = (g * s) · w_qᵀ for int8; for int4 the
group's scale row multiplies the unpacked weights first, one accumulator per group of the tile.
All dims are zero-padded to the tiles (powers of two >= 16).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from reslm.kernels_pallas import base
from reslm.kernels_pallas.quant_matmul.config import QuantConfig, error, gpu_tiles

_F32 = jnp.float32
_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)


def _interpret(cfg: QuantConfig) -> bool:
  if isinstance(cfg.interpret, bool):
    return cfg.interpret
  raise error(f"interpret={cfg.interpret!r} is not usable by the GPU kernel; pass a bool")


def _pad(a, *shape):
  pads = [(0, s - d) for s, d in zip(shape, a.shape, strict=True)]
  return jnp.pad(a, pads) if any(p for _, p in pads) else a


def _unpack(packed, dtype):
  p = packed.astype(jnp.int32)
  lo = ((p << 28) >> 28).astype(_F32).astype(dtype)
  hi = ((p << 24) >> 28).astype(_F32).astype(dtype)
  return lo, hi


def _dot_nt(a, b):
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _fwd_kernel(*refs, kind: str, nk: int, bk: int, group: int, has_scales: bool):
  if kind == "int4":
    xe_ref, xo_ref, w_ref, s_ref, o_ref = refs
  elif kind == "int8" or not has_scales:
    x_ref, w_ref, *s_refs, o_ref = refs
  else:
    x_ref, w_ref, xs_ref, ws_ref, o_ref = refs
  bm, bn = o_ref.shape

  if kind == "int4":
    half, per_tile = group // 2, bk // group

    def step(kk, acc):
      for gi in range(per_tile):
        cols = pl.ds((kk * per_tile + gi) * half, half)
        lo, hi = _unpack(w_ref[cols, :], xe_ref.dtype)
        part = jnp.dot(xe_ref[:, cols], lo, preferred_element_type=_F32)
        part += jnp.dot(xo_ref[:, cols], hi, preferred_element_type=_F32)
        acc += part * s_ref[pl.ds(kk * per_tile + gi, 1), :]
      return acc

    o_ref[...] = lax.fori_loop(0, nk, step, jnp.zeros((bm, bn), _F32)).astype(o_ref.dtype)
    return

  acc_dtype = jnp.int32 if kind == "int8_int8" else _F32

  def step(kk, acc):
    x = x_ref[:, pl.ds(kk * bk, bk)]
    w = w_ref[pl.ds(kk * bk, bk), :]
    if kind == "int8":
      w = w.astype(x.dtype)
    return acc + jnp.dot(x, w, preferred_element_type=acc_dtype)

  acc = lax.fori_loop(0, nk, step, jnp.zeros((bm, bn), acc_dtype))
  if kind == "int8":
    acc = acc * s_refs[0][...]
  elif has_scales:
    acc = acc.astype(_F32) * xs_ref[...] * ws_ref[...]
  o_ref[...] = acc.astype(o_ref.dtype)


def matmul(cfg: QuantConfig, x, w, scales, x_scale=None):
  """The forward kernel: x [M, K] -> [M, N] in cfg.out_dtype."""
  t = gpu_tiles(cfg)
  bm, bn, bk = t.block_m, t.block_n, t.block_k
  grid = (t.m // bm, t.n // bn)
  row_spec = pl.BlockSpec((1, bn), lambda i, j: (0, j))
  if cfg.kind == "int4":
    g = cfg.group_size
    x = _pad(x, t.m, t.k)
    operands = [x[:, 0::2], x[:, 1::2], _pad(w, t.k // 2, t.n)]
    operands.append(_pad(scales.astype(_F32), t.k // g, t.n))
    half_spec = pl.BlockSpec((bm, t.k // 2), lambda i, j: (i, 0))
    in_specs = [half_spec, half_spec, pl.BlockSpec((t.k // 2, bn), lambda i, j: (0, j))]
    in_specs.append(pl.BlockSpec((t.k // g, bn), lambda i, j: (0, j)))
  else:
    operands = [_pad(x, t.m, t.k), _pad(w, t.k, t.n)]
    in_specs = [
      pl.BlockSpec((bm, t.k), lambda i, j: (i, 0)),
      pl.BlockSpec((t.k, bn), lambda i, j: (0, j)),
    ]
    if cfg.kind == "int8":
      operands.append(_pad(scales.astype(_F32).reshape(1, -1), 1, t.n))
      in_specs.append(row_spec)
    elif cfg.has_scales:
      operands.append(_pad(x_scale.astype(_F32).reshape(-1, 1), t.m, 1))
      operands.append(_pad(scales.astype(_F32).reshape(1, -1), 1, t.n))
      in_specs += [pl.BlockSpec((bm, 1), lambda i, j: (i, 0)), row_spec]
  out_dtype = jnp.dtype(cfg.out_dtype)
  w_bytes = sum(a.size * a.dtype.itemsize for a in operands[2 if cfg.kind == "int4" else 1 :])
  x_bytes = sum(a.size * a.dtype.itemsize for a in operands[: 2 if cfg.kind == "int4" else 1])
  out = base.pallas_call(
    functools.partial(
      _fwd_kernel,
      kind=cfg.kind,
      nk=t.k // bk,
      bk=bk,
      group=cfg.group_size,
      has_scales=cfg.has_scales,
    ),
    out_shape=jax.ShapeDtypeStruct((t.m, t.n), out_dtype),
    grid=grid,
    in_specs=in_specs,
    out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
    compiler_params=_PARAMS,
    cost_estimate=pl.CostEstimate(
      flops=2 * t.m * t.n * t.k,
      transcendentals=0,
      bytes_accessed=int(x_bytes * grid[1] + w_bytes * grid[0] + t.m * t.n * out_dtype.itemsize),
    ),
    interpret=_interpret(cfg),
    name=f"quant_matmul_{cfg.kind}",
  )(*operands)
  return out[: cfg.m, : cfg.n]


def _dx_kernel(*refs, kind: str, nr: int, bn: int, group: int):
  if kind == "int8":
    g_ref, w_ref, dx_ref = refs
    bm, bk = dx_ref.shape

    def step(r, acc):
      g = g_ref[:, pl.ds(r * bn, bn)]
      return acc + _dot_nt(g, w_ref[:, pl.ds(r * bn, bn)].astype(g.dtype))

    dx_ref[...] = lax.fori_loop(0, nr, step, jnp.zeros((bm, bk), _F32)).astype(dx_ref.dtype)
    return

  g_ref, w_ref, s_ref, de_ref, do_ref = refs
  bm, half_tile = de_ref.shape
  half = group // 2

  def step(r, accs):
    g = g_ref[:, pl.ds(r * bn, bn)]
    out = []
    for gi in range(half_tile // half):
      lo, hi = _unpack(w_ref[pl.ds(gi * half, half), pl.ds(r * bn, bn)], _F32)
      s = s_ref[pl.ds(gi, 1), pl.ds(r * bn, bn)]
      out.append(accs[2 * gi] + _dot_nt(g, (lo * s).astype(g.dtype)))
      out.append(accs[2 * gi + 1] + _dot_nt(g, (hi * s).astype(g.dtype)))
    return tuple(out)

  zeros = tuple(jnp.zeros((bm, half), _F32) for _ in range(2 * (half_tile // half)))
  accs = lax.fori_loop(0, nr, step, zeros)
  for gi in range(half_tile // half):
    cols = slice(gi * half, (gi + 1) * half)
    de_ref[:, cols] = accs[2 * gi].astype(de_ref.dtype)
    do_ref[:, cols] = accs[2 * gi + 1].astype(do_ref.dtype)


def matmul_dx(cfg: QuantConfig, g, w, scales):
  """The gradient kernel: cotangent g [M, N] -> dx [M, K] in x's dtype (int8 and int4 only)."""
  t = gpu_tiles(cfg)
  bm, bn, bk = t.block_m, t.block_n, t.block_k
  grid = (t.m // bm, t.k // bk)
  x_dtype = jnp.dtype(cfg.x_dtype)
  g_spec = pl.BlockSpec((bm, t.n), lambda i, j: (i, 0))
  if cfg.kind == "int8":
    g = (g.astype(_F32) * scales.astype(_F32)).astype(g.dtype)
    operands = [_pad(g, t.m, t.n), _pad(w, t.k, t.n)]
    in_specs = [g_spec, pl.BlockSpec((bk, t.n), lambda i, j: (j, 0))]
    out_shape = jax.ShapeDtypeStruct((t.m, t.k), x_dtype)
    out_specs = pl.BlockSpec((bm, bk), lambda i, j: (i, j))
  else:
    gs = cfg.group_size
    operands = [
      _pad(g, t.m, t.n),
      _pad(w, t.k // 2, t.n),
      _pad(scales.astype(_F32), t.k // gs, t.n),
    ]
    in_specs = [
      g_spec,
      pl.BlockSpec((bk // 2, t.n), lambda i, j: (j, 0)),
      pl.BlockSpec((bk // gs, t.n), lambda i, j: (j, 0)),
    ]
    out_shape = [jax.ShapeDtypeStruct((t.m, t.k // 2), x_dtype)] * 2
    out_specs = [pl.BlockSpec((bm, bk // 2), lambda i, j: (i, j))] * 2
  out = base.pallas_call(
    functools.partial(_dx_kernel, kind=cfg.kind, nr=t.n // bn, bn=bn, group=cfg.group_size),
    out_shape=out_shape,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    compiler_params=_PARAMS,
    cost_estimate=pl.CostEstimate(
      flops=2 * t.m * t.n * t.k,
      transcendentals=0,
      bytes_accessed=int(
        sum(a.size * a.dtype.itemsize for a in operands) + t.m * t.k * x_dtype.itemsize
      ),
    ),
    interpret=_interpret(cfg),
    name=f"quant_matmul_{cfg.kind}_dx",
  )(*operands)
  if cfg.kind == "int8":
    return out[: cfg.m, : cfg.k]
  dx = jnp.stack(out, axis=-1).reshape(t.m, t.k)
  return dx[: cfg.m, : cfg.k]

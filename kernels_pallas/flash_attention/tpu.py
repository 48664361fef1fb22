"""FlashAttention-2 for TPU as Pallas (Mosaic) kernels: a forward kernel and two backward kernels.

Layout. Inputs are moved to head-major [batch, kv_heads, group, seq, head_dim] (queries) and
[batch, kv_heads, seq, head_dim] (keys/values), sequences zero-padded to the tile sizes. One kernel
program handles `heads_per_block` query heads of one kv group, so a key/value tile read from HBM
serves all of them and the (block_q, block_kv) mask is built once for the group.

Forward, grid (batch, kv_heads, head_blocks, q_blocks, kv_blocks), the kv axis last ("arbitrary",
the rest "parallel"): the online softmax keeps the running max m and sum l lane-replicated
(block_q, 128) float32 and the output accumulator (block_q, head_dim) float32 in VMEM scratch; the
last kv step writes out = acc / l and lse = m + log l (lane-replicated, float32).

Backward, with D = rowsum(dO ∘ O) - dlse computed in XLA and P = exp(S - lse) recomputed per tile:
  dq kernel, grid (batch, kv_heads, head_blocks, q_blocks, kv_blocks):  dQ = Σ_j dS K · scale
  dk/dv kernel, grid (batch, kv_heads, kv_blocks, head_blocks, q_blocks), the last two
  "arbitrary":  dV = Σ Pᵀ dO,  dK = Σ dSᵀ Q · scale,  dS = P ∘ (dO Vᵀ - D),
summing over every query head of the group inside the kernel (the dk/dv output tile is revisited
only on consecutive steps).

Masking. Causal tiles entirely above the diagonal are skipped, and their index_map is clamped to
the last (forward, dq) or first (dk/dv) useful tile, so a skipped step asks for the block that is
already resident and no DMA is issued. Tiles crossing the diagonal, the last kv tile when kv_len is
padded, and every tile when segment ids are given, are masked with a finite MASK_VALUE; tiles fully
below the diagonal run unmasked. Rows that see no key output zeros, lse = -inf.

Numerics: bfloat16 inputs feed the MXU as bfloat16 with float32 accumulation; float32 inputs use
`Precision.HIGHEST` (a TPU otherwise rounds float32 matmul operands to bfloat16). The softmax and all
accumulators are float32.
"""

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from reslm.kernels_pallas import base
from reslm.kernels_pallas.base import LANES, round_up
from reslm.kernels_pallas.flash_attention.config import (
  MASK_VALUE,
  FlashConfig,
  TpuBlocks,
  tpu_blocks,
)

_F32 = jnp.float32
_VMEM_DEFAULT = 12 * 2**20  # Stay under the smallest default scoped-VMEM limit (16 MiB).
_VMEM_MAX = 64 * 2**20  # v5p / 7x VMEM per core.


# ----------------------------------------------------------------------------- in-kernel helpers


def _dot(a, b, precision, contract=((1,), (0,))):
  return lax.dot_general(
    a, b, (contract, ((), ())), precision=precision, preferred_element_type=_F32
  )


def _dot_nt(a, b, precision):
  """a [m, k] · b[n, k]ᵀ -> [m, n]."""
  return _dot(a, b, precision, ((1,), (1,)))


def _dot_tn(a, b, precision):
  """a[k, m]ᵀ · b [k, n] -> [m, n]."""
  return _dot(a, b, precision, ((0,), (0,)))


def _cols(x, width: int):
  """A lane-replicated (rows, 128) statistic as (rows, width)."""
  if width == LANES:
    return x
  if width < LANES:
    return x[:, :width]
  if width % LANES == 0:
    return jnp.concatenate([x] * (width // LANES), axis=1)
  return jnp.broadcast_to(x[:, :1], (x.shape[0], width))


class _Tile:
  """Static facts one kernel body needs (plain Python values)."""

  def __init__(self, cfg: FlashConfig, bq: int, bk: int, bg: int, kv_pad: bool):
    self.causal, self.scale, self.has_segments = cfg.causal, cfg.scale, cfg.has_segments
    self.kv_len, self.kv_pad = cfg.kv_len, kv_pad
    self.bq, self.bk, self.bg, self.d = bq, bk, bg, cfg.head_dim
    self.precision = lax.Precision.HIGHEST if cfg.dtype == "float32" else None

  def mask(self, i, j, seg_refs):
    """The (bq, bk) visibility of query tile i against kv tile j."""
    shape, conds = (self.bq, self.bk), []
    if self.causal or self.kv_pad:
      col = j * self.bk + lax.broadcasted_iota(jnp.int32, shape, 1)
    if self.causal:
      conds.append(col <= i * self.bq + lax.broadcasted_iota(jnp.int32, shape, 0))
    if self.kv_pad:
      conds.append(col < self.kv_len)
    if self.has_segments:
      q_seg, kv_seg = seg_refs
      conds.append(q_seg[...][:, :1] == kv_seg[...])  # (bq, 1) == (1, bk)
    return functools.reduce(operator.and_, conds)

  def run(self, i, j, num_kv_tiles, body):
    """Calls body(masked) under pl.when for the tile pair (i, j) if any entry is visible; tiles that
    need no mask (fully below the diagonal, not the padded last kv tile, no segments) get False."""
    visible = j * self.bk <= i * self.bq + self.bq - 1 if self.causal else None
    if self.has_segments:
      partial = True
    else:
      parts = []
      if self.causal:
        parts.append(j * self.bk + self.bk - 1 > i * self.bq)  # Crosses the diagonal.
      if self.kv_pad:
        parts.append(j == num_kv_tiles - 1)
      partial = functools.reduce(operator.or_, parts) if parts else False

    def when(cond, fn):
      if cond is None:
        fn()
      else:
        pl.when(cond)(fn)

    if partial is True or partial is False:
      when(visible, lambda: body(bool(partial)))
      return
    both = (lambda c: c) if visible is None else (lambda c: visible & c)
    when(both(partial), lambda: body(True))
    when(both(jnp.logical_not(partial)), lambda: body(False))

  def scores(self, q, k, mask):
    """Scaled float32 scores of one head, masked entries set to MASK_VALUE."""
    s = _dot_nt(q, k, self.precision) * self.scale
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _heads(tile: _Tile, body):
  """Runs body(g) for the query heads of the program's group block."""
  if tile.bg == 1:
    body(0)
  else:
    lax.fori_loop(0, tile.bg, lambda g, c: (body(g), c)[1], 0)


def _split(refs, has_segments: bool, num_in: int):
  """(inputs, (q_seg, kv_seg) or None, rest) from a kernel's flat refs."""
  ins, rest = refs[:num_in], refs[num_in:]
  if has_segments:
    return ins, rest[:2], rest[2:]
  return ins, None, rest


# --------------------------------------------------------------------------------------- kernels


def _fwd_kernel(*refs, tile: _Tile, num_kv_tiles: int):
  (q_ref, k_ref, v_ref), segs, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _split(
    refs, tile.has_segments, 3
  )
  i, j = pl.program_id(3), pl.program_id(4)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, _F32)
    l_scr[...] = jnp.zeros(l_scr.shape, _F32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)

  def step(masked: bool):
    k, v = k_ref[...], v_ref[...]
    mask = tile.mask(i, j, segs) if masked else None

    def head(g):
      s = tile.scores(q_ref[g], k, mask)  # (bq, bk)
      m_prev, l_prev = m_scr[g], l_scr[g]  # (bq, 128)
      m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
      p = jnp.exp(s - _cols(m_next, tile.bk))
      alpha = jnp.exp(m_prev - m_next)  # Rescales what was accumulated under the old max.
      m_scr[g] = m_next
      l_scr[g] = alpha * l_prev + p.sum(axis=1, keepdims=True)
      pv = _dot(p.astype(v.dtype), v, tile.precision)
      acc_scr[g] = acc_scr[g] * _cols(alpha, tile.d) + pv

    _heads(tile, head)

  tile.run(i, j, num_kv_tiles, step)

  @pl.when(j == num_kv_tiles - 1)
  def _finish():
    def head(g):
      m, total = m_scr[g], l_scr[g]
      empty = m == MASK_VALUE  # No visible key: m never left its initial value.
      out = acc_scr[g] / _cols(total, tile.d)
      o_ref[g] = jnp.where(_cols(empty, tile.d), 0.0, out).astype(o_ref.dtype)
      lse_ref[g] = jnp.where(empty, -jnp.inf, m + jnp.log(total))

    _heads(tile, head)


def _probs_and_ds(tile, q, k, v, do, lse, di, mask):
  """Recomputed P = exp(S - lse) and dS = P ∘ (dO Vᵀ - D) of one head, both (bq, bk) float32."""
  p = jnp.exp(tile.scores(q, k, mask) - _cols(lse, tile.bk))
  dp = _dot_nt(do, v, tile.precision)
  return p, p * (dp - _cols(di, tile.bk))


def _dq_kernel(*refs, tile: _Tile, num_kv_tiles: int):
  ins, segs, (dq_ref, acc_scr) = _split(refs, tile.has_segments, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref = ins
  i, j = pl.program_id(3), pl.program_id(4)

  @pl.when(j == 0)
  def _init():
    acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)

  def step(masked: bool):
    k, v = k_ref[...], v_ref[...]
    mask = tile.mask(i, j, segs) if masked else None

    def head(g):
      _, ds = _probs_and_ds(tile, q_ref[g], k, v, do_ref[g], lse_ref[g], di_ref[g], mask)
      acc_scr[g] = acc_scr[g] + _dot(ds.astype(k.dtype), k, tile.precision)

    _heads(tile, head)

  tile.run(i, j, num_kv_tiles, step)

  @pl.when(j == num_kv_tiles - 1)
  def _finish():
    dq_ref[...] = (acc_scr[...] * tile.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, tile: _Tile, num_q_tiles: int, num_kv_tiles: int, num_head_blocks: int):
  ins, segs, (dk_ref, dv_ref, dk_scr, dv_scr) = _split(refs, tile.has_segments, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref = ins
  j, hb, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((hb == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, _F32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, _F32)

  def step(masked: bool):
    k, v = k_ref[...], v_ref[...]
    mask = tile.mask(i, j, segs) if masked else None

    def head(g):
      q, do = q_ref[g], do_ref[g]
      p, ds = _probs_and_ds(tile, q, k, v, do, lse_ref[g], di_ref[g], mask)
      dv_scr[...] = dv_scr[...] + _dot_tn(p.astype(do.dtype), do, tile.precision)
      dk_scr[...] = dk_scr[...] + _dot_tn(ds.astype(q.dtype), q, tile.precision)

    _heads(tile, head)

  tile.run(i, j, num_kv_tiles, step)

  @pl.when((hb == num_head_blocks - 1) & (i == num_q_tiles - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * tile.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------------- layout and calls


def _to_heads(x, length: int):
  """[b, t, heads, d] -> [b, heads, length, d], zero-padded along t."""
  x = jnp.swapaxes(x, 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def _rows(x, cfg: FlashConfig, length: int, fill=0.0):
  """A per-query float [b, t, heads] -> lane-replicated [b, kv_heads, group, length, 128]."""
  x = jnp.swapaxes(x, 1, 2).astype(_F32)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2])), constant_values=fill)
  x = x.reshape(cfg.batch, cfg.num_kv_heads, cfg.group, length, 1)
  return jnp.broadcast_to(x, (*x.shape[:-1], LANES))


def _segment_inputs(q_seg, kv_seg, tq_p: int, tk_p: int):
  """Segment ids as kernel operands: q lane-replicated [b, tq_p, 128], kv [b, 1, tk_p]."""
  q_seg = jnp.pad(q_seg, ((0, 0), (0, tq_p - q_seg.shape[1])))
  kv_seg = jnp.pad(kv_seg, ((0, 0), (0, tk_p - kv_seg.shape[1])))
  return jnp.broadcast_to(q_seg[:, :, None], (*q_seg.shape, LANES)), kv_seg[:, None, :]


def _visible_pairs(cfg: FlashConfig, bq: int, bk: int, nq: int, nk: int) -> int:
  """How many (q tile, kv tile) pairs a kernel computes."""
  if not cfg.causal:
    return nq * nk
  return sum(min(nk, (i * bq + bq - 1) // bk + 1) for i in range(nq))


def _q_tile_fetches(cfg: FlashConfig, bq: int, bk: int, nq: int, nk: int) -> int:
  """Query tiles the dk/dv kernel fetches per head block, summed over kv tiles: a causal kv tile j
  starts at the first query tile that sees it (earlier steps re-address that tile, so no DMA)."""
  if not cfg.causal:
    return nq * nk
  return sum(max(1, nq - min(nq, j * bk // bq)) for j in range(nk))


def _cost(cfg, bq, bk, nq, nk, matmuls: int, nbytes: int) -> pl.CostEstimate:
  """Analytic cost: `matmuls` (bq, bk, d) products and one exp per score of every computed tile."""
  scores = cfg.batch * cfg.num_heads * _visible_pairs(cfg, bq, bk, nq, nk) * bq * bk
  return pl.CostEstimate(
    flops=int(2 * matmuls * scores * cfg.head_dim),
    transcendentals=int(scores),
    bytes_accessed=int(nbytes),
  )


def _params(semantics, vmem_bytes: int) -> pltpu.CompilerParams:
  limit = None
  if vmem_bytes > _VMEM_DEFAULT:
    limit = min(int(vmem_bytes * 1.5), _VMEM_MAX)
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _interpret(cfg: FlashConfig):
  """The pallas_call `interpret` argument: False, True or the TPU simulator's params."""
  if isinstance(cfg.interpret, bool | pltpu.InterpretParams):
    return cfg.interpret
  raise ValueError(
    f"flash_attention: interpret={cfg.interpret!r} is not usable by the TPU kernel; "
    "pass a bool or a pltpu.InterpretParams"
  )


def _nbytes(*arrays) -> int:
  return sum(x.size * x.dtype.itemsize for x in arrays)


def forward(cfg: FlashConfig, q, k, v, q_seg, kv_seg):
  """Forward kernel: (out [b, tq, heads, d] in q's dtype, lse float32 [b, tq, heads])."""
  blocks: TpuBlocks = tpu_blocks(cfg)
  bq, bk, bg = blocks.block_q, blocks.block_kv, blocks.heads_per_block
  b, hk, g, d = cfg.batch, cfg.num_kv_heads, cfg.group, cfg.head_dim
  tq_p, tk_p = round_up(cfg.q_len, bq), round_up(cfg.kv_len, bk)
  nq, nk, nh = tq_p // bq, tk_p // bk, g // bg
  tile = _Tile(cfg, bq, bk, bg, kv_pad=tk_p != cfg.kv_len)
  q_t = _to_heads(q, tq_p).reshape(b, hk, g, tq_p, d)
  k_t, v_t = _to_heads(k, tk_p), _to_heads(v, tk_p)

  def kv_tile(i, j):
    if not cfg.causal:
      return j
    return jnp.minimum(j, lax.div(i * bq + bq - 1, bk))  # Skipped tiles reuse the last useful one.

  q_spec = pl.BlockSpec((None, None, bg, bq, d), lambda b_, h, hb, i, j: (b_, h, hb, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h, hb, i, j: (b_, h, kv_tile(i, j), 0))
  stat_spec = pl.BlockSpec((None, None, bg, bq, LANES), lambda b_, h, hb, i, j: (b_, h, hb, i, 0))
  in_specs, operands = [q_spec, kv_spec, kv_spec], [q_t, k_t, v_t]
  if cfg.has_segments:
    in_specs += [
      pl.BlockSpec((None, bq, LANES), lambda b_, h, hb, i, j: (b_, i, 0)),
      pl.BlockSpec((None, 1, bk), lambda b_, h, hb, i, j: (b_, 0, kv_tile(i, j))),
    ]
    operands += list(_segment_inputs(q_seg, kv_seg, tq_p, tk_p))
  out_shape = [
    jax.ShapeDtypeStruct(q_t.shape, q.dtype),
    jax.ShapeDtypeStruct((b, hk, g, tq_p, LANES), _F32),
  ]
  item = q.dtype.itemsize
  vmem = 2 * (2 * bg * bq * d * item + 2 * bk * d * item + bg * bq * LANES * 4)
  vmem += bg * bq * (2 * LANES + d) * 4 + 3 * bq * bk * 4
  # A kv tile is fetched once per computed (q tile, kv tile) pair and head block: a skipped causal
  # step re-addresses the resident tile, so it costs no DMA.
  kv_bytes = nh * _visible_pairs(cfg, bq, bk, nq, nk) * (_nbytes(k_t, v_t) // nk)
  out_t, lse_t = base.pallas_call(
    functools.partial(_fwd_kernel, tile=tile, num_kv_tiles=nk),
    out_shape=out_shape,
    grid=(b, hk, nh, nq, nk),
    in_specs=in_specs,
    out_specs=[q_spec, stat_spec],
    scratch_shapes=[
      pltpu.VMEM((bg, bq, LANES), _F32),  # Running max m.
      pltpu.VMEM((bg, bq, LANES), _F32),  # Running sum l.
      pltpu.VMEM((bg, bq, d), _F32),  # Output accumulator.
    ],
    compiler_params=_params(("parallel",) * 4 + ("arbitrary",), vmem),
    cost_estimate=_cost(cfg, bq, bk, nq, nk, 2, 2 * _nbytes(q_t) + kv_bytes + q_t.size // d * 512),
    interpret=_interpret(cfg),
    name="flash_attention_fwd",
  )(*operands)
  out = out_t.reshape(b, cfg.num_heads, tq_p, d)[:, :, : cfg.q_len]
  lse = lse_t[..., 0].reshape(b, cfg.num_heads, tq_p)[:, :, : cfg.q_len]
  return jnp.swapaxes(out, 1, 2), jnp.swapaxes(lse, 1, 2)


def backward(cfg: FlashConfig, q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse):
  """The dq and dk/dv kernels: gradients w.r.t. q, k, v for cotangents (d_out, d_lse)."""
  blocks = tpu_blocks(cfg)
  bq, bk, bg = blocks.block_q_bwd, blocks.block_kv_bwd, blocks.heads_per_block
  b, hk, g, d = cfg.batch, cfg.num_kv_heads, cfg.group, cfg.head_dim
  tq_p, tk_p = round_up(cfg.q_len, bq), round_up(cfg.kv_len, bk)
  nq, nk, nh = tq_p // bq, tk_p // bk, g // bg
  tile = _Tile(cfg, bq, bk, bg, kv_pad=tk_p != cfg.kv_len)
  q_t = _to_heads(q, tq_p).reshape(b, hk, g, tq_p, d)
  do_t = _to_heads(d_out, tq_p).reshape(b, hk, g, tq_p, d)
  k_t, v_t = _to_heads(k, tk_p), _to_heads(v, tk_p)
  # D = rowsum(dO ∘ O) - dlse: then dS = P ∘ (dP - D) also carries the lse cotangent.
  delta = jnp.einsum("bthd,bthd->bth", d_out.astype(_F32), out.astype(_F32)) - d_lse
  # A row that sees no key has lse = -inf; +inf makes its recomputed P exactly 0.
  lse_t = _rows(jnp.where(lse == -jnp.inf, jnp.inf, lse), cfg, tq_p)
  di_t = _rows(delta, cfg, tq_p)
  seg_ops = list(_segment_inputs(q_seg, kv_seg, tq_p, tk_p)) if cfg.has_segments else []
  item = q.dtype.itemsize
  vmem = 2 * (2 * bg * bq * d * item + 2 * bg * bq * LANES * 4 + 2 * bk * d * item)
  vmem += 4 * bq * bk * 4

  # dq: grid (b, kv_heads, head_blocks, q_tiles, kv_tiles), the kv axis reduced.
  def kv_tile(i, j):
    return jnp.minimum(j, lax.div(i * bq + bq - 1, bk)) if cfg.causal else j

  q_spec = pl.BlockSpec((None, None, bg, bq, d), lambda b_, h, hb, i, j: (b_, h, hb, i, 0))
  stat_spec = pl.BlockSpec((None, None, bg, bq, LANES), lambda b_, h, hb, i, j: (b_, h, hb, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h, hb, i, j: (b_, h, kv_tile(i, j), 0))
  seg_specs = [
    pl.BlockSpec((None, bq, LANES), lambda b_, h, hb, i, j: (b_, i, 0)),
    pl.BlockSpec((None, 1, bk), lambda b_, h, hb, i, j: (b_, 0, kv_tile(i, j))),
  ]
  ins = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec]
  kv_bytes = nh * _visible_pairs(cfg, bq, bk, nq, nk) * (_nbytes(k_t, v_t) // nk)  # As forward.
  dq_t = base.pallas_call(
    functools.partial(_dq_kernel, tile=tile, num_kv_tiles=nk),
    out_shape=jax.ShapeDtypeStruct(q_t.shape, q.dtype),
    grid=(b, hk, nh, nq, nk),
    in_specs=ins + (seg_specs if cfg.has_segments else []),
    out_specs=q_spec,
    scratch_shapes=[pltpu.VMEM((bg, bq, d), _F32)],
    compiler_params=_params(("parallel",) * 4 + ("arbitrary",), vmem + bg * bq * d * 4),
    cost_estimate=_cost(cfg, bq, bk, nq, nk, 3, 3 * _nbytes(q_t) + kv_bytes + 2 * _nbytes(di_t)),
    interpret=_interpret(cfg),
    name="flash_attention_dq",
  )(q_t, k_t, v_t, do_t, lse_t, di_t, *seg_ops)

  # dk/dv: grid (b, kv_heads, kv_tiles, head_blocks, q_tiles), the last two reduced.
  def q_tile(i, j):
    if not cfg.causal:
      return i
    return jnp.minimum(jnp.maximum(i, lax.div(j * bk, bq)), nq - 1)  # Skip tiles before the first.

  q_spec = pl.BlockSpec(
    (None, None, bg, bq, d), lambda b_, h, j, hb, i: (b_, h, hb, q_tile(i, j), 0)
  )
  stat_spec = pl.BlockSpec(
    (None, None, bg, bq, LANES), lambda b_, h, j, hb, i: (b_, h, hb, q_tile(i, j), 0)
  )
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h, j, hb, i: (b_, h, j, 0))
  seg_specs = [
    pl.BlockSpec((None, bq, LANES), lambda b_, h, j, hb, i: (b_, q_tile(i, j), 0)),
    pl.BlockSpec((None, 1, bk), lambda b_, h, j, hb, i: (b_, 0, j)),
  ]
  ins = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec]
  q_bytes = _q_tile_fetches(cfg, bq, bk, nq, nk) * (_nbytes(q_t, do_t, lse_t, di_t) // nq)
  dk_t, dv_t = base.pallas_call(
    functools.partial(_dkv_kernel, tile=tile, num_q_tiles=nq, num_kv_tiles=nk, num_head_blocks=nh),
    out_shape=[jax.ShapeDtypeStruct(k_t.shape, k.dtype)] * 2,
    grid=(b, hk, nk, nh, nq),
    in_specs=ins + (seg_specs if cfg.has_segments else []),
    out_specs=[kv_spec, kv_spec],
    scratch_shapes=[pltpu.VMEM((bk, d), _F32), pltpu.VMEM((bk, d), _F32)],
    compiler_params=_params(("parallel",) * 3 + ("arbitrary",) * 2, vmem + 4 * bk * d * 4),
    cost_estimate=_cost(cfg, bq, bk, nq, nk, 4, 2 * _nbytes(k_t, v_t) + q_bytes),
    interpret=_interpret(cfg),
    name="flash_attention_dkv",
  )(q_t, k_t, v_t, do_t, lse_t, di_t, *seg_ops)

  dq = jnp.swapaxes(dq_t.reshape(b, cfg.num_heads, tq_p, d)[:, :, : cfg.q_len], 1, 2)
  dk = jnp.swapaxes(dk_t[:, :, : cfg.kv_len], 1, 2)
  dv = jnp.swapaxes(dv_t[:, :, : cfg.kv_len], 1, 2)
  return dq, dk, dv

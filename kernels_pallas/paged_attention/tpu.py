"""Paged-attention decode for TPU as a Pallas (Mosaic) kernel with manual, double-buffered page DMA.

Grid (batch, kv_heads, page blocks), the page-block axis last ("arbitrary"). One program sees the
`group` query heads that share one kv head as a (group, head_dim) tile, so each page is read from
HBM once for all of them. The sequence lengths and the flattened block table are scalar-prefetched
into SMEM; the page pools stay in HBM (`pl.ANY`) and the kernel copies each page it needs,
`pltpu.make_async_copy(pool.at[kv_head, page], buffer.at[slot, i], sem)`, into a two-slot VMEM
buffer: while block j is computed, block j + 1's pages are in flight. Pages past a sequence's
length are neither copied nor computed (block-table entries there are never read as page ids); the
first block of each sequence is not overlapped with the previous sequence.

Per page: scores (group, page_size) = q · kᵀ · scale (· k_scale per token for int8 pages), tokens
past the length masked, then the online-softmax update of the running max m and sum l
(lane-replicated (group, 128) float32) and the float32 accumulator (group, head_dim) in VMEM
scratch; v rows past the length are zeroed so stale cache contents (even NaN) cannot leak. int8
pages are dequantized in VMEM: k and v to q's dtype (exact), the per-token scales multiply the
scores and the probabilities. The last step writes acc / l (zeros for an empty sequence).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from reslm.kernels_pallas import base
from reslm.kernels_pallas.base import LANES
from reslm.kernels_pallas.paged_attention.config import (
  MASK_VALUE,
  PagedConfig,
  error,
  tpu_pages_per_block,
)

_F32 = jnp.float32


def _interpret(cfg: PagedConfig):
  if isinstance(cfg.interpret, bool | pltpu.InterpretParams):
    return cfg.interpret
  raise error(
    f"interpret={cfg.interpret!r} is not usable by the TPU kernel; pass a bool or a "
    "pltpu.InterpretParams"
  )


def _kernel(lengths_ref, tables_ref, q_ref, *refs, cfg: PagedConfig, ppb: int, num_blocks: int):
  if cfg.quantized:
    k_hbm, v_hbm, ks_hbm, vs_hbm, o_ref, k_buf, v_buf, ks_buf, vs_buf, sems, m_scr, l_scr, acc = (
      refs
    )
    pools = ((k_hbm, k_buf), (v_hbm, v_buf), (ks_hbm, ks_buf), (vs_hbm, vs_buf))
  else:
    k_hbm, v_hbm, o_ref, k_buf, v_buf, sems, m_scr, l_scr, acc = refs
    pools = ((k_hbm, k_buf), (v_hbm, v_buf))
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  ps, pps = cfg.page_size, cfg.pages_per_seq
  length = lengths_ref[b]
  n_pages = lax.div(length + ps - 1, ps)
  n_blocks = lax.div(n_pages + ppb - 1, ppb)

  def dma_page(block, slot, i, action: str):
    """Starts or waits the copies of page i of block `block` into `slot` (if the page is used)."""
    pos = block * ppb + i

    @pl.when(pos < n_pages)
    def _page():
      page = tables_ref[b * pps + jnp.minimum(pos, pps - 1)]
      for n, (hbm, buf) in enumerate(pools):
        copy = pltpu.make_async_copy(hbm.at[h, page], buf.at[slot, i], sems.at[n, slot])
        getattr(copy, action)()

  def dma(block, slot, action: str):
    for i in range(ppb):
      dma_page(block, slot, i, action)

  def attend_page(q, slot, i):
    """Online-softmax update with page i of the current block (if the page is used)."""
    precision = lax.Precision.HIGHEST if q.dtype == _F32 else None
    pos = j * ppb + i

    @pl.when(pos < n_pages)
    def _page():
      k, v = k_buf[slot, i], v_buf[slot, i]  # (page_size, head_dim)
      if cfg.quantized:
        k, v = k.astype(_F32).astype(q.dtype), v.astype(_F32).astype(q.dtype)
      s = lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=_F32
      )
      s = s * cfg.scale  # (group, page_size)
      if cfg.quantized:
        s = s * ks_buf[slot, i]  # (1, page_size) per-token key scale.
      token = pos * ps + lax.broadcasted_iota(jnp.int32, (1, ps), 1)
      s = jnp.where(token < length, s, MASK_VALUE)
      m_prev, l_prev = m_scr[...], l_scr[...]  # (group, 128)
      m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
      p = jnp.exp(s - m_next[:, :1])
      alpha = jnp.exp(m_prev - m_next)
      m_scr[...] = m_next
      l_scr[...] = alpha * l_prev + p.sum(axis=1, keepdims=True)
      if cfg.quantized:
        p = p * vs_buf[slot, i]  # Per-token value scale, folded into the probabilities.
      p = jnp.where(token < length, p, 0.0)
      rows = pos * ps + lax.broadcasted_iota(jnp.int32, (ps, 1), 0)
      v = jnp.where(rows < length, v, jnp.zeros_like(v))
      pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=_F32,
      )  # fmt: skip
      acc[...] = acc[...] * alpha[:, :1] + pv

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, _F32)
    l_scr[...] = jnp.zeros(l_scr.shape, _F32)
    acc[...] = jnp.zeros(acc.shape, _F32)

    @pl.when(n_blocks > 0)
    def _first():
      dma(0, 0, "start")

  @pl.when(j < n_blocks)
  def _compute():
    slot = lax.rem(j, 2)

    @pl.when(j + 1 < n_blocks)
    def _prefetch():
      dma(j + 1, 1 - slot, "start")

    dma(j, slot, "wait")
    q = q_ref[...]  # (group, head_dim)
    for i in range(ppb):
      attend_page(q, slot, i)

  @pl.when(j == num_blocks - 1)
  def _finish():
    total = l_scr[...][:, :1]
    out = acc[...] / jnp.where(total > 0, total, 1.0)
    o_ref[...] = jnp.where(total > 0, out, 0.0).astype(o_ref.dtype)


def paged_attention(cfg: PagedConfig, q, k_pages, v_pages, lengths, block_tables, k_scale, v_scale):
  """q [batch, heads, head_dim] -> [batch, heads, head_dim]."""
  ppb = tpu_pages_per_block(cfg)
  num_blocks = -(-cfg.pages_per_seq // ppb)
  b, hk, g, d, ps = cfg.batch, cfg.num_kv_heads, cfg.group, cfg.head_dim, cfg.page_size
  q4 = q.reshape(b, hk, g, d)
  q_spec = pl.BlockSpec((None, None, g, d), lambda b_, h, j, *_: (b_, h, 0, 0))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  operands = [q4, k_pages, v_pages]
  kv_dtype = k_pages.dtype
  scratch = [pltpu.VMEM((2, ppb, ps, d), kv_dtype), pltpu.VMEM((2, ppb, ps, d), kv_dtype)]
  if cfg.quantized:
    # One (1, page_size) row of scales per page: a DMA of whole rows, usable as a score scale.
    operands += [
      k_scale.astype(_F32).reshape(hk, cfg.num_pages, 1, ps),
      v_scale.astype(_F32).reshape(hk, cfg.num_pages, 1, ps),
    ]
    scratch += [pltpu.VMEM((2, ppb, 1, ps), _F32), pltpu.VMEM((2, ppb, 1, ps), _F32)]
  scratch += [
    pltpu.SemaphoreType.DMA((len(operands) - 1, 2)),
    pltpu.VMEM((g, LANES), _F32),  # Running max m.
    pltpu.VMEM((g, LANES), _F32),  # Running sum l.
    pltpu.VMEM((g, d), _F32),  # Output accumulator.
  ]
  tokens = cfg.pages_per_seq * ps
  kv_bytes = 2 * b * hk * tokens * d * kv_dtype.itemsize
  if cfg.quantized:
    kv_bytes += 2 * b * hk * tokens * 4
  out = base.pallas_call(
    functools.partial(_kernel, cfg=cfg, ppb=ppb, num_blocks=num_blocks),
    out_shape=jax.ShapeDtypeStruct(q4.shape, q.dtype),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, hk, num_blocks),
      in_specs=[q_spec] + [any_spec] * (len(operands) - 1),
      out_specs=q_spec,
      scratch_shapes=scratch,
    ),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    cost_estimate=pl.CostEstimate(
      flops=4 * b * cfg.num_heads * tokens * d,
      transcendentals=b * cfg.num_heads * tokens,
      bytes_accessed=int(kv_bytes + 2 * q.size * q.dtype.itemsize + block_tables.size * 4),
    ),
    interpret=_interpret(cfg),
    name="paged_attention",
  )(lengths, block_tables.reshape(-1), *operands)
  return out.reshape(q.shape)

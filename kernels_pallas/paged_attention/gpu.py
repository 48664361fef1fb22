"""Paged-attention decode for NVIDIA GPUs as a Pallas Triton kernel that gathers pages by index.

Why Triton (see also `kernels_pallas/quant_matmul/gpu.py`): the kernel gathers pages with a
vector of page ids straight from the pool (`pool_ref[page_ids]`), masks tokens per element and
runs a data-dependent loop, which Triton expresses directly; it runs in the same Pallas
interpreter as the TPU kernel and exports for CUDA from a CPU host. The Triton backend is
deprecated since jax 0.11 (it warns); a Mosaic GPU port (per-page TMA copies) is future work.

Grid (batch, kv_heads): one program per sequence and kv head, its `group` query heads as rows of
one tile (padded to >= 16 rows for the tensor-core dot). It loops over blocks of pages up to the
sequence's length: gathers the block's pages of k and v (block-table entries clipped into the pool,
tokens past the length masked and their v rows zeroed), and updates a float32 online softmax. int8
pages are converted to q's dtype; their per-token scales multiply the scores and probabilities.
No split over the sequence (flash-decoding): one program walks the whole sequence.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from reslm.kernels_pallas import base
from reslm.kernels_pallas.paged_attention.config import (
  MASK_VALUE,
  PagedConfig,
  error,
  gpu_pages_per_block,
)

_F32 = jnp.float32
_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)


def _interpret(cfg: PagedConfig) -> bool:
  if isinstance(cfg.interpret, bool):
    return cfg.interpret
  raise error(f"interpret={cfg.interpret!r} is not usable by the GPU kernel; pass a bool")


def _kernel(lengths_ref, tables_ref, q_ref, k_ref, v_ref, *refs, cfg: PagedConfig, ppb: int):
  if cfg.quantized:
    ks_ref, vs_ref, o_ref = refs
  else:
    (o_ref,) = refs
  b = pl.program_id(0)
  rows, d = q_ref.shape
  ps = cfg.page_size
  tokens = ppb * ps
  length = lengths_ref[b]
  q = q_ref[...]

  def step(j, carry):
    acc, m, total = carry
    pages = tables_ref[pl.ds(j * ppb, ppb)]
    k = k_ref[pages].reshape(tokens, d)
    v = v_ref[pages].reshape(tokens, d)
    if cfg.quantized:
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    token = j * tokens + lax.broadcasted_iota(jnp.int32, (1, tokens), 1)
    valid = token < length
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=_F32) * cfg.scale
    if cfg.quantized:
      s = s * ks_ref[pages].reshape(1, tokens)
    s = jnp.where(valid, s, MASK_VALUE)
    m_next = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp(s - m_next[:, None])
    alpha = jnp.exp(m - m_next)
    total = alpha * total + p.sum(axis=1)
    if cfg.quantized:
      p = p * vs_ref[pages].reshape(1, tokens)
    p = jnp.where(valid, p, 0.0)
    v_rows = j * tokens + lax.broadcasted_iota(jnp.int32, (tokens, 1), 0)
    v = jnp.where(v_rows < length, v, jnp.zeros_like(v))
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=_F32)
    return acc, m_next, total

  n_blocks = lax.div(length + tokens - 1, tokens)
  init = (jnp.zeros((rows, d), _F32), jnp.full((rows,), MASK_VALUE, _F32), jnp.zeros((rows,), _F32))
  acc, _, total = lax.fori_loop(0, n_blocks, step, init)
  out = acc / jnp.where(total > 0, total, 1.0)[:, None]
  o_ref[...] = jnp.where((total > 0)[:, None], out, 0.0).astype(o_ref.dtype)


def paged_attention(cfg: PagedConfig, q, k_pages, v_pages, lengths, block_tables, k_scale, v_scale):
  """q [batch, heads, head_dim] -> [batch, heads, head_dim]."""
  ppb = gpu_pages_per_block(cfg)
  b, hk, g, d = cfg.batch, cfg.num_kv_heads, cfg.group, cfg.head_dim
  rows = max(16, 1 << (g - 1).bit_length())
  q4 = jnp.pad(q.reshape(b, hk, g, d), ((0, 0), (0, 0), (0, rows - g), (0, 0)))
  width = -(-cfg.pages_per_seq // ppb) * ppb
  tables = jnp.pad(block_tables, ((0, 0), (0, width - cfg.pages_per_seq)))
  pool = (cfg.num_pages, cfg.page_size)
  q_spec = pl.BlockSpec((None, None, rows, d), lambda b_, h: (b_, h, 0, 0))
  in_specs = [
    pl.BlockSpec((b,), lambda b_, h: (0,)),
    pl.BlockSpec((None, width), lambda b_, h: (b_, 0)),
    q_spec,
    pl.BlockSpec((None, *pool, d), lambda b_, h: (h, 0, 0, 0)),
    pl.BlockSpec((None, *pool, d), lambda b_, h: (h, 0, 0, 0)),
  ]
  operands = [lengths, tables, q4, k_pages, v_pages]
  if cfg.quantized:
    in_specs += [pl.BlockSpec((None, *pool), lambda b_, h: (h, 0, 0))] * 2
    operands += [k_scale.astype(_F32), v_scale.astype(_F32)]
  tokens = cfg.pages_per_seq * cfg.page_size
  out = base.pallas_call(
    functools.partial(_kernel, cfg=cfg, ppb=ppb),
    out_shape=jax.ShapeDtypeStruct(q4.shape, q.dtype),
    grid=(b, hk),
    in_specs=in_specs,
    out_specs=q_spec,
    compiler_params=_PARAMS,
    cost_estimate=pl.CostEstimate(
      flops=4 * b * cfg.num_heads * tokens * d,
      transcendentals=b * cfg.num_heads * tokens,
      bytes_accessed=int(
        2 * b * hk * tokens * d * k_pages.dtype.itemsize + 2 * q.size * q.dtype.itemsize
      ),
    ),
    interpret=_interpret(cfg),
    name="paged_attention",
  )(*operands)
  return out[:, :, :g].reshape(q.shape)

"""The public paged-attention decode function: checks and the per-platform dispatch.

`implementation="auto"` stages every backend with `jax.lax.platform_dependent` (TPU kernel on
"tpu", GPU kernel on "cuda", the jnp reference anywhere else), chosen when the program is lowered,
never by querying the live device. A cache layout a kernel cannot take (TPU: page_size not a
multiple of the dtype's sublane tiling; GPU: head_dim or page_size not a power of two) runs the
reference on that platform under "auto", and raises under "tpu" / "gpu". Decode only:
there is no gradient (every input passes through `lax.stop_gradient`), so the kernels are never
differentiated.
"""

import jax
import jax.numpy as jnp
from jax import lax

from reslm.kernels_pallas import base
from reslm.kernels_pallas.paged_attention import reference, tpu
from reslm.kernels_pallas.paged_attention.config import (
  BlockSizes,
  PagedConfig,
  gpu_pages_per_block,
  gpu_unsupported,
  make_config,
  tpu_pages_per_block,
  tpu_unsupported,
)

__all__ = ["BlockSizes", "paged_attention"]


def paged_attention(
  q: jax.Array,
  k_pages: jax.Array,
  v_pages: jax.Array,
  lengths: jax.Array,
  block_tables: jax.Array,
  *,
  k_scale: jax.Array | None = None,
  v_scale: jax.Array | None = None,
  scale: float | None = None,
  block_sizes: BlockSizes | None = None,
  implementation: str = "auto",
  interpret=False,
) -> jax.Array:
  """One decode step of grouped-query attention against a paged KV cache.

  Args:
    q: [batch, heads, head_dim] float32 or bfloat16, one query per sequence.
    k_pages: [kv_heads, pages, page_size, head_dim] in q's dtype, or int8 with k_scale.
    v_pages: Same shape and dtype as k_pages.
    lengths: int [batch] tokens in each sequence's cache (clipped to the block table's capacity).
    block_tables: int [batch, pages_per_seq]; token t of sequence b is in page
      block_tables[b, t // page_size]. Entries past the length are ignored (may hold anything);
      ids are clipped into [0, pages).
    k_scale: float [kv_heads, pages, page_size], one scale per cached token (int8 pages only).
    v_scale: Same for v_pages.
    scale: Static multiplier of q kᵀ; default head_dim ** -0.5.
    block_sizes: `BlockSizes(pages_per_block=...)`; None takes the backend default.
    implementation: "auto" (per-platform dispatch), "tpu", "gpu" or "reference".
    interpret: Run the Pallas kernels in interpret mode (CPU tests): True, or a
      `pltpu.InterpretParams` for the TPU simulator.

  Returns:
    [batch, heads, head_dim] in q's dtype (zeros for a sequence of length 0).

  Raises:
    ValueError: One line, for bad shapes, dtypes, arguments or block sizes (before lowering).
  """
  cfg = make_config(
    q, k_pages, v_pages, lengths, block_tables, k_scale=k_scale, v_scale=v_scale, scale=scale,
    block_sizes=block_sizes, implementation=implementation, interpret=interpret,
  )  # fmt: skip
  # Raise block/page-size errors here, not inside a trace.
  if cfg.implementation == "tpu" or (cfg.implementation == "auto" and not tpu_unsupported(cfg)):
    tpu_pages_per_block(cfg)
  if cfg.implementation == "gpu" or (cfg.implementation == "auto" and not gpu_unsupported(cfg)):
    gpu_pages_per_block(cfg)
  capacity = cfg.pages_per_seq * cfg.page_size
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, capacity)
  tables = jnp.clip(block_tables.astype(jnp.int32), 0, cfg.num_pages - 1)
  args = (q, k_pages, v_pages, lengths, tables, k_scale, v_scale)
  args = tuple(None if a is None else lax.stop_gradient(a) for a in args)
  return _dispatch(cfg, *args)


def _gpu():
  from reslm.kernels_pallas.paged_attention import gpu  # noqa: PLC0415 (Triton only when needed)

  return gpu


def _reference(cfg: PagedConfig, q, k_pages, v_pages, lengths, tables, k_scale, v_scale):
  return reference.paged_attention(
    q, k_pages, v_pages, lengths, tables, k_scale=k_scale, v_scale=v_scale, scale=cfg.scale
  )


def _dispatch(cfg: PagedConfig, *args):
  reference = base.bind(_reference, cfg)
  return base.dispatch(
    cfg.implementation,
    args,
    reference=reference,
    tpu=base.bind(tpu.paged_attention, cfg),
    gpu=lambda: base.bind(_gpu().paged_attention, cfg),
    # Under "auto", a call a kernel cannot take runs the reference on that platform.
    tpu_auto=reference if tpu_unsupported(cfg) else None,
    cuda_auto=(lambda: reference) if gpu_unsupported(cfg) else None,
  )

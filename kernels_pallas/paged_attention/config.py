"""Static knobs of paged-attention decode and the input checks shared by every backend.

`BlockSizes` is what a caller may set; `PagedConfig` is the static description of one call. Every
problem raises a one-line ValueError naming the argument, the bad value and what is allowed,
before anything is lowered.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from reslm.kernels_pallas import base

DTYPES = ("float32", "bfloat16")
# Finite, so a fully masked block gives exp(0) = 1 instead of NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
TPU_SUBLANES = {"float32": 8, "bfloat16": 16, "int8": 32}  # Row tiling of one page per dtype.


def error(message: str) -> ValueError:
  return base.error("paged_attention", message)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes; a None field takes the backend default.

  Attributes:
    pages_per_block: Pages per compute step. TPU: pages fetched by one (double-buffered) DMA
      round, default 512 tokens' worth; GPU: pages gathered per inner-loop step, a power of two,
      default 64 tokens' worth.
  """

  pages_per_block: int | None = None

  def __post_init__(self):
    base.check_block_sizes("paged_attention", self)


TPU_TOKENS_PER_BLOCK = 512  # Not tuned on hardware (none was available).
GPU_TOKENS_PER_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class PagedConfig:
  """Everything static about one call (hashable).

  Attributes:
    batch: Sequences B (one query each).
    num_heads: Query heads.
    num_kv_heads: Key/value heads (divides num_heads).
    head_dim: Width of each head.
    num_pages: Pages in the pool P.
    page_size: Tokens per page.
    pages_per_seq: Block-table width (max pages per sequence).
    dtype: Name of q's dtype.
    kv_dtype: Name of the cache dtype (q's dtype, or int8 with scales).
    scale: Multiplier of q kᵀ.
    block_sizes: The caller's tile sizes.
    implementation: One of IMPLEMENTATIONS.
    interpret: False, True or a `pltpu.InterpretParams`.
  """

  batch: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  num_pages: int
  page_size: int
  pages_per_seq: int
  dtype: str
  kv_dtype: str
  scale: float
  block_sizes: BlockSizes
  implementation: str
  interpret: object = False

  @property
  def group(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def quantized(self) -> bool:
    return self.kv_dtype == "int8"


def _shape(a):
  return tuple(getattr(a, "shape", ()))


def make_config(
  q, k_pages, v_pages, lengths, block_tables, *, k_scale, v_scale, scale, block_sizes,
  implementation, interpret,
) -> PagedConfig:  # fmt: skip
  """Checks the arguments of `api.paged_attention`."""
  base.check_implementation("paged_attention", implementation)
  if block_sizes is None:
    block_sizes = BlockSizes()
  if not isinstance(block_sizes, BlockSizes):
    raise error(f"block_sizes={block_sizes!r} must be a BlockSizes or None")
  if len(_shape(q)) != 3 or str(q.dtype) not in DTYPES:
    raise error(f"q must be [batch, heads, head_dim] in {DTYPES}; got {_shape(q)} {q.dtype}")
  if len(_shape(k_pages)) != 4 or _shape(k_pages) != _shape(v_pages):
    raise error(
      f"k_pages and v_pages must both be [kv_heads, pages, page_size, head_dim]; got "
      f"{_shape(k_pages)} and {_shape(v_pages)}"
    )
  b, h, d = _shape(q)
  hk, p, ps, dk = _shape(k_pages)
  if dk != d or h % hk:
    raise error(f"cache {_shape(k_pages)} does not fit q {_shape(q)} (head_dim, kv heads | heads)")
  if min(b, h, d, p, ps) < 1:
    raise error(f"every dim must be positive; got q {_shape(q)}, pages {_shape(k_pages)}")
  kv_dtype = str(k_pages.dtype)
  if kv_dtype != str(v_pages.dtype) or kv_dtype not in (str(q.dtype), "int8"):
    raise error(
      f"k_pages/v_pages dtypes {k_pages.dtype}/{v_pages.dtype} must both be q's ({q.dtype}) or int8"
    )
  if kv_dtype == "int8":
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
      if s is None or _shape(s) != (hk, p, ps) or not jnp.issubdtype(s.dtype, jnp.floating):
        raise error(
          f"int8 pages need float {name} of shape {(hk, p, ps)} (one per token and kv head); got "
          f"{None if s is None else (_shape(s), str(s.dtype))}"
        )
  elif k_scale is not None or v_scale is not None:
    raise error("k_scale/v_scale are only for int8 pages")
  if _shape(lengths) != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise error(f"lengths must be an integer array of shape ({b},); got {_shape(lengths)}")
  if (
    len(_shape(block_tables)) != 2
    or _shape(block_tables)[0] != b
    or not jnp.issubdtype(block_tables.dtype, jnp.integer)
    or _shape(block_tables)[1] < 1
  ):
    raise error(f"block_tables must be integer [{b}, pages_per_seq]; got {_shape(block_tables)}")
  if scale is None:
    scale = d**-0.5
  if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
    raise error(f"scale={scale!r} must be None or a finite Python float (it is static)")
  return PagedConfig(
    batch=b, num_heads=h, num_kv_heads=hk, head_dim=d, num_pages=p, page_size=ps,
    pages_per_seq=_shape(block_tables)[1], dtype=str(q.dtype), kv_dtype=kv_dtype,
    scale=float(scale), block_sizes=block_sizes, implementation=implementation,
    interpret=interpret,
  )  # fmt: skip


def tpu_unsupported(cfg: PagedConfig) -> str | None:
  """Why the TPU kernel cannot take this call (None if it can): a page is one DMA of whole
  sublane tiles of the cache dtype."""
  rows = TPU_SUBLANES[cfg.kv_dtype]
  if cfg.page_size % rows:
    return f"page_size={cfg.page_size} must be a multiple of {rows} for {cfg.kv_dtype} pages"
  return None


def tpu_pages_per_block(cfg: PagedConfig) -> int:
  """Pages per DMA round (raises if the TPU kernel cannot run the call)."""
  reason = tpu_unsupported(cfg)
  if reason:
    raise error(f"the TPU kernel cannot run this call: {reason}; use implementation='reference'")
  ppb = cfg.block_sizes.pages_per_block
  if ppb is None:
    ppb = max(1, TPU_TOKENS_PER_BLOCK // cfg.page_size)
  return min(ppb, cfg.pages_per_seq)


def _is_pow2(x: int) -> bool:
  return x >= 1 and not x & (x - 1)


def gpu_unsupported(cfg: PagedConfig) -> str | None:
  """Why the Triton kernel cannot take this call (None if it can): its tensors are powers of two,
  and padding head_dim or page_size would copy the whole cache."""
  if not _is_pow2(cfg.head_dim) or cfg.head_dim < 16:
    return f"head_dim={cfg.head_dim} must be a power of two >= 16"
  if not _is_pow2(cfg.page_size):
    return f"page_size={cfg.page_size} must be a power of two"
  return None


def gpu_pages_per_block(cfg: PagedConfig) -> int:
  reason = gpu_unsupported(cfg)
  if reason:
    raise error(f"the GPU kernel cannot run this call: {reason}; use implementation='reference'")
  ppb = cfg.block_sizes.pages_per_block
  if ppb is not None and not _is_pow2(ppb):
    raise error(
      f"block_sizes.pages_per_block={ppb} is not allowed for the GPU kernel; use a power of two"
    )
  if ppb is None:
    ppb = max(1, GPU_TOKENS_PER_BLOCK // cfg.page_size)
  ppb = max(ppb, -(-16 // cfg.page_size))  # Dots need >= 16 tokens per step.
  return ppb

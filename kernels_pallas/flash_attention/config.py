"""Static knobs of flash attention and the input checks shared by every backend.

`BlockSizes` is what a caller may set; `FlashConfig` is the full static description of one call
(shapes, mask, scale, implementation) that the kernels are specialised on; `TpuBlocks` and
`GpuBlocks` are the concrete, checked tile sizes of each backend. Every problem raises a one-line
ValueError naming the argument, the bad value and what is allowed, before anything is lowered.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from reslm.kernels_pallas import base
from reslm.kernels_pallas.base import LANES, round_up

DTYPES = ("float32", "bfloat16")
# Finite, so a fully masked block gives exp(0) = 1 instead of NaN; such rows are zeroed at the end.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _error(message: str) -> ValueError:
  return base.error("flash_attention", message)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes; a None field takes the backend's default (`TPU_DEFAULTS`, `GPU_DEFAULTS`).

  Attributes:
    block_q: Query rows per forward tile.
    block_kv: Key/value rows per forward tile.
    block_q_bwd: Query rows per tile of both backward kernels (default: block_q).
    block_kv_bwd: Key/value rows per tile of both backward kernels (default: block_kv).
    heads_per_block: TPU only: query heads of one key/value group handled by one kernel program,
      so a key/value tile read from HBM serves all of them (must divide num_heads/num_kv_heads).
  """

  block_q: int | None = None
  block_kv: int | None = None
  block_q_bwd: int | None = None
  block_kv_bwd: int | None = None
  heads_per_block: int | None = None

  def __post_init__(self):
    base.check_block_sizes("flash_attention", self)


# Defaults, not tuned on hardware (none was available). TPU: kv tiles a multiple of the 128 lanes,
# heads_per_block picked so that a tile holds <= TPU_MAX_ROWS query rows. GPU: one 64-row wgmma tile.
TPU_DEFAULTS = BlockSizes(block_q=256, block_kv=512)
TPU_MAX_ROWS = 1024
GPU_DEFAULTS = BlockSizes(block_q=64, block_kv=64)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Everything static about one call; hashable, so it can be a `nondiff_argnums` argument.

  Attributes:
    causal: Query i sees key j only if j <= i (both counted from 0, top-left aligned).
    scale: Multiplier of q kᵀ.
    batch: Batch size.
    q_len: Query length.
    kv_len: Key/value length.
    num_heads: Query heads.
    num_kv_heads: Key/value heads (divides num_heads).
    head_dim: Width of each head.
    dtype: Name of the (common) input dtype.
    has_segments: Whether segment ids restrict attention to equal ids.
    block_sizes: The caller's tile sizes (fields may be None).
    implementation: One of IMPLEMENTATIONS.
    interpret: False, True or a `pltpu.InterpretParams` / `plgpu.InterpretGPUParams`.
  """

  causal: bool
  scale: float
  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: str
  has_segments: bool
  block_sizes: BlockSizes
  implementation: str
  interpret: object = False

  @property
  def group(self) -> int:
    """Query heads per key/value head."""
    return self.num_heads // self.num_kv_heads


def _check_int_ids(name: str, ids, shape) -> jax.Array:
  if not hasattr(ids, "shape") or tuple(ids.shape) != tuple(shape):
    got = getattr(ids, "shape", type(ids).__name__)
    raise _error(f"{name} has shape {got}; expected {tuple(shape)} ([batch, seq])")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise _error(f"{name} has dtype {ids.dtype}; expected an integer dtype")
  return jnp.asarray(ids, jnp.int32)


def make_config(
  q, k, v, *, segment_ids, causal, scale, block_sizes, implementation, interpret
) -> tuple[FlashConfig, jax.Array | None, jax.Array | None]:
  """Checks the arguments of `api.flash_attention`.

  Returns:
    (config, q_segment_ids or None, kv_segment_ids or None), segment ids as int32 [batch, seq].
  """
  base.check_implementation("flash_attention", implementation)
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise _error(
        f"{name} must be [batch, seq, heads, head_dim]; got shape {getattr(x, 'shape', None)}"
      )
    if str(x.dtype) not in DTYPES:
      raise _error(f"{name} has dtype {x.dtype}; the kernels support {DTYPES}")
  if not q.dtype == k.dtype == v.dtype:
    raise _error(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  if k.shape != v.shape:
    raise _error(f"k and v must have the same shape; got {k.shape} and {v.shape}")
  b, tq, h, d = q.shape
  _, tk, hk, dk = k.shape
  if k.shape[0] != b or dk != d:
    raise _error(f"k/v shape {k.shape} does not match q shape {q.shape} in batch or head_dim")
  if h % hk:
    raise _error(f"kv heads ({hk}) must divide query heads ({h})")
  if min(q.shape + k.shape) < 1:
    raise _error(f"every dimension must be positive; got q {q.shape}, k {k.shape}")
  if not isinstance(causal, bool):
    raise _error(f"causal={causal!r} must be a Python bool")
  if scale is None:
    scale = d**-0.5
  if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
    raise _error(f"scale={scale!r} must be None or a finite Python float (it is static)")
  if block_sizes is None:
    block_sizes = BlockSizes()
  if not isinstance(block_sizes, BlockSizes):
    raise _error(f"block_sizes={block_sizes!r} must be a BlockSizes or None")
  q_seg = kv_seg = None
  if segment_ids is not None:
    if isinstance(segment_ids, tuple | list):
      if len(segment_ids) != 2:
        raise _error("segment_ids must be one [batch, seq] array or a (q_ids, kv_ids) pair")
      q_seg = _check_int_ids("q segment_ids", segment_ids[0], (b, tq))
      kv_seg = _check_int_ids("kv segment_ids", segment_ids[1], (b, tk))
    else:
      if tq != tk:
        raise _error(f"q_len {tq} != kv_len {tk}: pass segment_ids as a (q_ids, kv_ids) pair")
      q_seg = kv_seg = _check_int_ids("segment_ids", segment_ids, (b, tq))
  cfg = FlashConfig(
    causal=causal,
    scale=float(scale),
    batch=b,
    q_len=tq,
    kv_len=tk,
    num_heads=h,
    num_kv_heads=hk,
    head_dim=d,
    dtype=str(q.dtype),
    has_segments=q_seg is not None,
    block_sizes=block_sizes,
    implementation=implementation,
    interpret=interpret,
  )
  return cfg, q_seg, kv_seg


@dataclasses.dataclass(frozen=True)
class TpuBlocks:
  """Checked TPU tiles, clipped to the (padded) sequence lengths."""

  block_q: int
  block_kv: int
  block_q_bwd: int
  block_kv_bwd: int
  heads_per_block: int


def _pick(user: int | None, default: int) -> int:
  return default if user is None else user


def tpu_blocks(cfg: FlashConfig) -> TpuBlocks:
  """Tile sizes for the Mosaic TPU kernels.

  Query tiles must be multiples of the 8 sublanes and kv tiles multiples of the 128 lanes; a tile
  longer than the padded sequence is shrunk to it (to a multiple of 16 for bfloat16, which packs
  two rows per sublane).
  """
  user = cfg.block_sizes
  sub, clip = 8, (16 if cfg.dtype == "bfloat16" else 8)
  bq = _pick(user.block_q, TPU_DEFAULTS.block_q)
  bk = _pick(user.block_kv, TPU_DEFAULTS.block_kv)
  sizes = dict(
    block_q=bq, block_kv=bk, block_q_bwd=_pick(user.block_q_bwd, bq),
    block_kv_bwd=_pick(user.block_kv_bwd, bk),
  )  # fmt: skip
  for name, size in sizes.items():
    multiple = sub if name.startswith("block_q") else LANES
    if size % multiple:
      raise _error(
        f"block_sizes.{name}={size} is not allowed for the TPU kernel; "
        f"it must be a multiple of {multiple}"
      )
    limit = round_up(cfg.q_len, clip) if name.startswith("block_q") else round_up(cfg.kv_len, LANES)
    sizes[name] = min(size, limit)
  group = cfg.group
  heads = user.heads_per_block
  if heads is None:
    rows = max(sizes["block_q"], sizes["block_q_bwd"])
    fits = [d for d in range(1, group + 1) if group % d == 0 and d * rows <= TPU_MAX_ROWS]
    heads = max(fits, default=1)
  elif group % heads:
    raise _error(
      f"block_sizes.heads_per_block={heads} must divide the query heads per kv head ({group})"
    )
  return TpuBlocks(**sizes, heads_per_block=heads)


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
  """Checked Mosaic GPU tiles, clipped to the (padded) sequence lengths."""

  block_q: int
  block_kv: int
  block_q_bwd: int
  block_kv_bwd: int


GPU_TILE = 64  # wgmma rows per warpgroup; also 128-byte swizzled bfloat16 rows of P.


def gpu_blocks(cfg: FlashConfig) -> GpuBlocks:
  """Tile sizes for the Mosaic GPU kernels: multiples of 64 (a tile longer than the sequence, padded
  to 64, is shrunk to it)."""
  user = cfg.block_sizes
  if user.heads_per_block not in (None, 1):
    raise _error(f"block_sizes.heads_per_block={user.heads_per_block} is TPU-only; leave it None")
  bq = _pick(user.block_q, GPU_DEFAULTS.block_q)
  bk = _pick(user.block_kv, GPU_DEFAULTS.block_kv)
  sizes = dict(
    block_q=bq, block_kv=bk, block_q_bwd=_pick(user.block_q_bwd, bq),
    block_kv_bwd=_pick(user.block_kv_bwd, bk),
  )  # fmt: skip
  for name, size in sizes.items():
    if size % GPU_TILE:
      raise _error(
        f"block_sizes.{name}={size} is not allowed for the GPU kernel; "
        f"it must be a multiple of {GPU_TILE}"
      )
    length = cfg.q_len if name.startswith("block_q") else cfg.kv_len
    sizes[name] = min(size, round_up(length, GPU_TILE))
  return GpuBlocks(**sizes)

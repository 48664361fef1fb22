"""Static knobs of the grouped matmul and the input checks shared by every backend.

`BlockSizes` is what a caller may set; `RaggedConfig` is the static description of one call;
`Tiles` holds a backend's checked tile sizes and padded dims. Every problem raises a one-line
ValueError naming the argument, the bad value and what is allowed, before anything is lowered.
"""

import dataclasses

from reslm.kernels_pallas import base
from reslm.kernels_pallas.base import LANES

DTYPES = ("float32", "bfloat16")
TPU_ROWS = 16  # Sublane tiling of bfloat16 rows (float32 needs 8): one rule for both dtypes.


def error(message: str) -> ValueError:
  return base.error("ragged_matmul", message)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes; a None field takes the backend default (`TPU_DEFAULTS`, `GPU_DEFAULTS`).

  Attributes:
    block_m: Rows (tokens) per tile. A tile that straddles group boundaries is visited once per
      group, so smaller tiles waste less work when groups are small.
    block_k: Reduction tile (lhs columns).
    block_n: Output columns per tile.
  """

  block_m: int | None = None
  block_k: int | None = None
  block_n: int | None = None

  def __post_init__(self):
    base.check_block_sizes("ragged_matmul", self)


# Not tuned on hardware (none was available).
TPU_DEFAULTS = BlockSizes(block_m=128, block_k=512, block_n=256)
GPU_DEFAULTS = BlockSizes(block_m=64, block_k=64, block_n=64)


@dataclasses.dataclass(frozen=True)
class RaggedConfig:
  """Everything static about one call; hashable (a `nondiff_argnums` argument).

  Attributes:
    m: Rows of lhs.
    k: Columns of lhs (rows of each rhs[g]).
    n: Columns of each rhs[g].
    groups: Number of groups G.
    dtype: Name of the (common) input dtype.
    block_sizes: The caller's tile sizes (fields may be None).
    implementation: One of IMPLEMENTATIONS.
    interpret: False, True or a `pltpu.InterpretParams`.
  """

  m: int
  k: int
  n: int
  groups: int
  dtype: str
  block_sizes: BlockSizes
  implementation: str
  interpret: object = False


def make_config(lhs, rhs, group_sizes, *, block_sizes, implementation, interpret) -> RaggedConfig:
  """Checks the arguments of `api.ragged_matmul`."""
  base.check_implementation("ragged_matmul", implementation)
  if block_sizes is None:
    block_sizes = BlockSizes()
  if not isinstance(block_sizes, BlockSizes):
    raise error(f"block_sizes={block_sizes!r} must be a BlockSizes or None")
  shape = lambda a: tuple(getattr(a, "shape", ()))
  if len(shape(lhs)) != 2 or len(shape(rhs)) != 3:
    raise error(f"lhs must be [M, K] and rhs [G, K, N]; got {shape(lhs)} and {shape(rhs)}")
  (m, k), (g, k2, n) = shape(lhs), shape(rhs)
  if k2 != k:
    raise error(f"lhs K={k} does not match rhs K={k2} (rhs is [G, K, N])")
  if min(m, k, g, n) < 1:
    raise error(f"every dim must be positive; got lhs {shape(lhs)}, rhs {shape(rhs)}")
  for name, a in (("lhs", lhs), ("rhs", rhs)):
    if str(a.dtype) not in DTYPES:
      raise error(f"{name} has dtype {a.dtype}; the kernels support {DTYPES}")
  if lhs.dtype != rhs.dtype:
    raise error(f"lhs and rhs must share one dtype; got {lhs.dtype} and {rhs.dtype}")
  if shape(group_sizes) != (g,) or "int" not in str(getattr(group_sizes, "dtype", "")):
    raise error(
      f"group_sizes must be an integer array of shape ({g},); got {shape(group_sizes)} "
      f"{getattr(group_sizes, 'dtype', type(group_sizes).__name__)}"
    )
  return RaggedConfig(m, k, n, g, str(lhs.dtype), block_sizes, implementation, interpret)


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Checked tile sizes and the dims padded to them."""

  block_m: int
  block_k: int
  block_n: int
  m: int
  k: int
  n: int


def tpu_tiles(cfg: RaggedConfig) -> Tiles:
  """Mosaic tiles: rows a multiple of 16, lanes a multiple of 128 (or one full-dim tile). The
  weight-gradient kernel uses the same tiles with K in the row position of its output, so K tiles
  are lane multiples too."""
  user = cfg.block_sizes
  bm, m = base.tpu_dim(
    "ragged_matmul", "block_m", cfg.m, user.block_m, TPU_DEFAULTS.block_m, TPU_ROWS
  )
  bk, k = base.tpu_dim("ragged_matmul", "block_k", cfg.k, user.block_k, TPU_DEFAULTS.block_k, LANES)
  bn, n = base.tpu_dim("ragged_matmul", "block_n", cfg.n, user.block_n, TPU_DEFAULTS.block_n, LANES)
  return Tiles(bm, bk, bn, m, k, n)


def gpu_tiles(cfg: RaggedConfig) -> Tiles:
  """Triton tiles: powers of two >= 16, shrunk to short dims; every dim zero-padded to its tile."""
  user, sizes = cfg.block_sizes, {}
  for name, dim in (("block_m", cfg.m), ("block_k", cfg.k), ("block_n", cfg.n)):
    sizes[name] = base.gpu_dim(
      "ragged_matmul", name, dim, getattr(user, name), getattr(GPU_DEFAULTS, name)
    )
  bm, bk, bn = sizes["block_m"], sizes["block_k"], sizes["block_n"]
  return Tiles(
    bm, bk, bn, base.round_up(cfg.m, bm), base.round_up(cfg.k, bk), base.round_up(cfg.n, bn)
  )

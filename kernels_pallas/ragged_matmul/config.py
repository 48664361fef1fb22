"""Static knobs of the grouped matmul and the input checks shared by every backend.

`BlockSizes` is what a caller may set; `RaggedConfig` is the static description of one call;
`Tiles` holds a backend's checked tile sizes and padded dims. Every problem raises a one-line
ValueError naming the argument, the bad value and what is allowed, before anything is lowered.
"""

import dataclasses

IMPLEMENTATIONS = ("auto", "reference", "tpu", "gpu")
DTYPES = ("float32", "bfloat16")
LANES = 128
TPU_ROWS = 16  # Sublane tiling of bfloat16 rows (float32 needs 8): one rule for both dtypes.


def error(message: str) -> ValueError:
  return ValueError(f"ragged_matmul: {message}")


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
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise error(
          f"block_sizes.{field.name}={value!r} is not allowed; use a positive int or None"
        )


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
  if implementation not in IMPLEMENTATIONS:
    raise error(f"implementation={implementation!r} is not known; use one of {IMPLEMENTATIONS}")
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


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Checked tile sizes and the dims padded to them."""

  block_m: int
  block_k: int
  block_n: int
  m: int
  k: int
  n: int


def _tpu_dim(name, dim, user, default, multiple):
  """(block, padded dim): one full-dim tile if it covers dim, else a multiple of `multiple`; the
  default shrinks to a divisor of dim when there is one (the weights then need no padding)."""
  if user is not None:
    if user >= dim:
      return dim, dim
    if user % multiple:
      raise error(
        f"block_sizes.{name}={user} is not allowed for the TPU kernel; use a multiple of "
        f"{multiple} or a size >= the dim ({dim})"
      )
    return user, round_up(dim, user)
  if default >= dim:
    return dim, dim
  for block in range(default, multiple - 1, -multiple):
    if dim % block == 0:
      return block, dim
  return default, round_up(dim, default)


def tpu_tiles(cfg: RaggedConfig) -> Tiles:
  """Mosaic tiles: rows a multiple of 16, lanes a multiple of 128 (or one full-dim tile). The
  weight-gradient kernel uses the same tiles with K in the row position of its output, so K tiles
  are lane multiples too."""
  user = cfg.block_sizes
  bm, m = _tpu_dim("block_m", cfg.m, user.block_m, TPU_DEFAULTS.block_m, TPU_ROWS)
  bk, k = _tpu_dim("block_k", cfg.k, user.block_k, TPU_DEFAULTS.block_k, LANES)
  bn, n = _tpu_dim("block_n", cfg.n, user.block_n, TPU_DEFAULTS.block_n, LANES)
  return Tiles(bm, bk, bn, m, k, n)


def _pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def gpu_tiles(cfg: RaggedConfig) -> Tiles:
  """Triton tiles: powers of two >= 16, shrunk to short dims; every dim zero-padded to its tile."""
  user, sizes = cfg.block_sizes, {}
  for name, dim in (("block_m", cfg.m), ("block_k", cfg.k), ("block_n", cfg.n)):
    value = getattr(user, name)
    if value is not None and (value < 16 or value & (value - 1)):
      raise error(
        f"block_sizes.{name}={value} is not allowed for the GPU kernel; use a power of two >= 16"
      )
    value = getattr(GPU_DEFAULTS, name) if value is None else value
    sizes[name] = min(value, max(16, _pow2(dim)))
  bm, bk, bn = sizes["block_m"], sizes["block_k"], sizes["block_n"]
  return Tiles(bm, bk, bn, round_up(cfg.m, bm), round_up(cfg.k, bk), round_up(cfg.n, bn))

"""Static knobs of the low-bit matmuls and the input checks shared by every backend.

`BlockSizes` is what a caller may set; `QuantConfig` is the full static description of one call
(kind, shapes, dtypes, implementation) that the kernels are specialised on; `Tiles` holds the
concrete, checked tile sizes and padded dims of one backend. Every problem raises a one-line
ValueError naming the argument, the bad value and what is allowed, before anything is lowered.
"""

import dataclasses
import math

import jax.numpy as jnp

from reslm.kernels_pallas import base
from reslm.kernels_pallas.base import LANES
from reslm.kernels_pallas.quant_matmul.packing import GROUP_SIZES

KINDS = ("int8", "int4", "int8_int8")
X_DTYPES = ("float32", "bfloat16")
OUT_DTYPES = ("float32", "bfloat16")
TPU_ROWS = 32  # Sublane tiling of int8 rows (float32 8, bfloat16 16): one rule for every operand.


def error(message: str) -> ValueError:
  return base.error("quant_matmul", message)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes; a None field takes the backend default (`TPU_DEFAULTS`, `GPU_DEFAULTS`).

  Attributes:
    block_m: Rows of x per tile.
    block_n: Output columns per tile.
    block_k: Reduction (K) rows per tile; for int4 a multiple of the group size.
  """

  block_m: int | None = None
  block_n: int | None = None
  block_k: int | None = None

  def __post_init__(self):
    base.check_block_sizes("quant_matmul", self)


# Not tuned on hardware (none was available). TPU: lane-dense 256-wide output tiles (v6e MXU) and a
# deep K tile; a dim smaller than its tile becomes one full-dim tile. GPU: tensor-core tiles.
TPU_DEFAULTS = BlockSizes(block_m=256, block_n=256, block_k=512)
GPU_DEFAULTS = BlockSizes(block_m=64, block_n=64, block_k=64)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Everything static about one call; hashable, so it can be a `nondiff_argnums` argument.

  Attributes:
    kind: One of KINDS.
    m: Rows of x (the product of its leading dims).
    n: Output columns.
    k: Reduction length (unpacked).
    group_size: int4 scale group along K (0 otherwise).
    x_dtype: Name of x's dtype.
    out_dtype: Name of the output dtype ("int32" for int8_int8 without scales).
    block_sizes: The caller's tile sizes (fields may be None).
    implementation: One of IMPLEMENTATIONS.
    interpret: False, True or a `pltpu.InterpretParams`.
  """

  kind: str
  m: int
  n: int
  k: int
  group_size: int
  x_dtype: str
  out_dtype: str
  block_sizes: BlockSizes
  implementation: str
  interpret: object = False

  @property
  def has_scales(self) -> bool:
    return self.out_dtype != "int32"


def _shape(x) -> tuple:
  return tuple(getattr(x, "shape", ()))


def _dtype(x) -> str:
  return str(getattr(x, "dtype", type(x).__name__))


def _check_2d_int8(name, w):
  if len(_shape(w)) != 2 or _dtype(w) != "int8":
    raise error(f"{name} must be a 2-D int8 array; got shape {_shape(w)}, dtype {_dtype(w)}")


def _check_scales(name, s, shape):
  if _shape(s) != tuple(shape) or not jnp.issubdtype(s.dtype, jnp.floating):
    raise error(
      f"{name} must be a float array of shape {tuple(shape)}; got {_shape(s)} {_dtype(s)}"
    )


def make_config(
  kind, x, w, scales, *, group_size, out_dtype, block_sizes, implementation, interpret, x_scale=None
) -> QuantConfig:
  """Checks the arguments of one public call (`api.py`) and returns its static description."""
  base.check_implementation("quant_matmul", implementation)
  if block_sizes is None:
    block_sizes = BlockSizes()
  if not isinstance(block_sizes, BlockSizes):
    raise error(f"block_sizes={block_sizes!r} must be a BlockSizes or None")
  if len(_shape(x)) < 1 or min(_shape(x)) < 1:
    raise error(f"x must be [..., K] with positive dims; got shape {_shape(x)}")
  _check_2d_int8("w_q" if kind != "int4" else "w_packed", w)
  k, n = _shape(x)[-1], _shape(w)[1]
  m = math.prod(_shape(x)[:-1])
  if min(_shape(w)) < 1:
    raise error(f"weights must have positive dims; got shape {_shape(w)}")
  if kind == "int8_int8":
    if _dtype(x) != "int8":
      raise error(f"x_q has dtype {_dtype(x)}; expected int8")
    if (x_scale is None) != (scales is None):
      raise error("pass both x_scale and w_scale (float output) or neither (raw int32 output)")
    if scales is not None:
      _check_scales("x_scale", x_scale, _shape(x)[:-1])
      _check_scales("w_scale", scales, (n,))
    out = "int32" if scales is None else jnp.dtype(out_dtype).name
  else:
    if _dtype(x) not in X_DTYPES:
      raise error(f"x has dtype {_dtype(x)}; the kernels support {X_DTYPES}")
    out = jnp.dtype(out_dtype or x.dtype).name
  if out not in OUT_DTYPES + ("int32",):
    raise error(f"out_dtype={out} is not supported; use one of {OUT_DTYPES}")
  if kind == "int4":
    if group_size not in GROUP_SIZES:
      raise error(f"group_size={group_size!r} is not allowed; use one of {GROUP_SIZES}")
    if _shape(w)[0] * 2 != k or k % group_size:
      raise error(
        f"w_packed shape {_shape(w)} needs K={k} = 2 * rows and K divisible by group_size="
        f"{group_size}"
      )
    _check_scales("scales", scales, (k // group_size, n))
  else:
    group_size = 0
    if _shape(w)[0] != k:
      raise error(f"x's K={k} does not match w_q's rows {_shape(w)[0]} (w_q is [K, N])")
    if kind == "int8":
      _check_scales("scales", scales, (n,))
  return QuantConfig(
    kind=kind, m=m, n=n, k=k, group_size=group_size, x_dtype=_dtype(x), out_dtype=out,
    block_sizes=block_sizes, implementation=implementation, interpret=interpret,
  )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Checked tile sizes and the dims padded to them (padding is a slow path for the weights)."""

  block_m: int
  block_n: int
  block_k: int
  m: int
  n: int
  k: int


def tpu_tiles(cfg: QuantConfig) -> Tiles:
  """Mosaic tiles: rows a multiple of 32 (int8 sublane tiling), lanes a multiple of 128; packed
  int4 K tiles hold 2 x 128 lanes and whole groups; a dim smaller than a tile is one full tile."""
  user = cfg.block_sizes
  bm, m = base.tpu_dim(
    "quant_matmul", "block_m", cfg.m, user.block_m, TPU_DEFAULTS.block_m, TPU_ROWS
  )
  bn, n = base.tpu_dim("quant_matmul", "block_n", cfg.n, user.block_n, TPU_DEFAULTS.block_n, LANES)
  k_multiple = 2 * LANES if cfg.kind == "int4" else LANES
  bk, k = base.tpu_dim(
    "quant_matmul", "block_k", cfg.k, user.block_k, TPU_DEFAULTS.block_k, k_multiple
  )
  return Tiles(bm, bn, bk, m, n, k)


def gpu_tiles(cfg: QuantConfig) -> Tiles:
  """Triton tiles: powers of two >= 16 (tensor-core dot), shrunk to short dims; for int4 block_k
  is a multiple of the group size (one scale per group inside a tile)."""
  user = cfg.block_sizes
  sizes = {}
  for name, dim in (("block_m", cfg.m), ("block_n", cfg.n), ("block_k", cfg.k)):
    sizes[name] = base.gpu_dim(
      "quant_matmul", name, dim, getattr(user, name), getattr(GPU_DEFAULTS, name)
    )
  if cfg.kind == "int4":
    sizes["block_k"] = max(sizes["block_k"], cfg.group_size)
  bm, bn, bk = sizes["block_m"], sizes["block_n"], sizes["block_k"]
  return Tiles(
    bm, bn, bk, base.round_up(cfg.m, bm), base.round_up(cfg.n, bn), base.round_up(cfg.k, bk)
  )

"""What every op folder shares: argument errors, block-size checks, tiling arithmetic, dispatch.

Each op names itself in its errors (`quant_matmul: block_sizes.block_k=3 is not allowed ...`) so
a message from deep inside a model still says which kernel refused what.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
from jax import lax
from jax.experimental import pallas as pl

IMPLEMENTATIONS = ("auto", "reference", "tpu", "gpu")
LANES = 128  # TPU vreg lanes: the last dim of a Mosaic block is a multiple of this (or whole).


def error(op: str, message: str) -> ValueError:
  """A one-line ValueError prefixed with the op's name."""
  return ValueError(f"{op}: {message}")


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def next_pow2(x: int) -> int:
  """The smallest power of two >= x (1 for x <= 1)."""
  return 1 << max(0, (x - 1).bit_length())


def is_positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_block_sizes(op: str, block_sizes) -> None:
  """Every field of a `BlockSizes` dataclass is a positive int or None (the backend default)."""
  for field in dataclasses.fields(block_sizes):
    value = getattr(block_sizes, field.name)
    if value is not None and not is_positive_int(value):
      raise error(
        op, f"block_sizes.{field.name}={value!r} is not allowed; use a positive int or None"
      )


def check_implementation(op: str, implementation: str) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise error(op, f"implementation={implementation!r} is not known; use one of {IMPLEMENTATIONS}")


def tpu_dim(op: str, name: str, dim: int, user: int | None, default: int, multiple: int):
  """(block, padded dim) of one Mosaic tile dimension.

  A block that covers `dim` becomes one full-dim block (always legal); otherwise it must be a
  multiple of `multiple` (sublanes or lanes). The default shrinks to a divisor of `dim` when one
  exists, so operands need no padding.
  """
  if user is not None:
    if user >= dim:
      return dim, dim
    if user % multiple:
      raise error(
        op,
        f"block_sizes.{name}={user} is not allowed for the TPU kernel; use a multiple of "
        f"{multiple} or a size >= the dim ({dim})",
      )
    return user, round_up(dim, user)
  if default >= dim:
    return dim, dim
  for block in range(default, multiple - 1, -multiple):
    if dim % block == 0:
      return block, dim
  return default, round_up(dim, default)


def gpu_dim(op: str, name: str, dim: int, user: int | None, default: int) -> int:
  """A Triton tile size: a power of two >= 16 (tensor-core dot), shrunk to a short dim."""
  if user is not None and (user < 16 or user & (user - 1)):
    raise error(
      op, f"block_sizes.{name}={user} is not allowed for the GPU kernel; use a power of two >= 16"
    )
  return min(default if user is None else user, max(16, next_pow2(dim)))


def dispatch(
  implementation: str,
  args: tuple,
  *,
  reference: Callable,
  tpu: Callable,
  gpu: Callable[[], Callable],
  tpu_auto: Callable | None = None,
  cuda_auto: Callable[[], Callable] | None = None,
):
  """Calls the configured backend on `args`; "auto" stages each with `lax.platform_dependent`.

  Args:
    implementation: One of IMPLEMENTATIONS.
    args: Operands; None entries (absent optional operands) are passed through as None.
    reference: The pure-jnp definition (CPU and any other platform under "auto").
    tpu: The Mosaic kernel.
    gpu: A thunk returning the GPU kernel (imported only when a GPU path is staged).
    tpu_auto: The callable "auto" stages for TPU if not `tpu` (e.g. the reference for a case the
      kernel does not support).
    cuda_auto: A thunk for the callable "auto" stages for CUDA if not `gpu()`.
  """
  if implementation == "reference":
    return reference(*args)
  if implementation == "tpu":
    return tpu(*args)
  if implementation == "gpu":
    return gpu()(*args)
  # platform_dependent passes arrays only: close over the absent (None) operands.
  present = [i for i, a in enumerate(args) if a is not None]

  def branch(fn):
    def call(*arrays):
      full = list(args)
      for i, a in zip(present, arrays, strict=True):
        full[i] = a
      return fn(*full)

    return call

  return lax.platform_dependent(
    *[args[i] for i in present],
    tpu=branch(tpu_auto or tpu),
    cuda=branch((cuda_auto or gpu)()),
    default=branch(reference),
  )


def bind(fn: Callable, cfg) -> Callable:
  """`fn` with its static config bound first (the backends' signature is `(cfg, *operands)`)."""
  return functools.partial(fn, cfg)


def _typed(out_shape, operands):
  """`out_shape` with every output varying over the manual mesh axes any operand varies over."""
  types = [jax.typeof(x) for x in jax.tree.leaves(operands)]
  varying = frozenset().union(*(t.mat.varying for t in types if hasattr(t, "mat")))
  mat = jax.sharding.ManualAxisType(varying=varying)

  def one(s):
    if isinstance(s, jax.ShapeDtypeStruct) and s.manual_axis_type is None:
      return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding, manual_axis_type=mat)
    return s

  return jax.tree.map(one, out_shape)


def pallas_call(kernel: Callable, *, out_shape, **kwargs) -> Callable:
  """`pl.pallas_call` that also works inside a `shard_map` with replication checks on.

  There (check_vma=True, `jax.shard_map`'s default) Pallas needs each output's manual axis type;
  a kernel's outputs depend on all its operands, so they vary over the manual mesh axes any
  operand varies over. Outside a shard_map the type is ignored.
  """

  def call(*operands):
    typed = _typed(out_shape, operands)
    return pl.pallas_call(kernel, out_shape=typed, **kwargs)(*operands)

  return call

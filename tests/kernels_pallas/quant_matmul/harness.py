"""Shared pieces of the low-bit matmul tests: the case grid, inputs, the forward + VJP runner,
dtype-scaled comparisons, the TPU simulator context, export and libtpu compile helpers."""

import contextlib
import dataclasses
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from reslm.kernels_pallas.quant_matmul import (
  BlockSizes,
  int4_matmul,
  int8_int8_matmul,
  int8_matmul,
  quantize_int4,
  quantize_int8,
  quantize_rows_int8,
)
from reslm.kernels_pallas.quant_matmul import reference as ref_lib

# Max error relative to max(1, max |expected|). float32: the kernels sum the same exact products in
# another order (~1e-6 observed); bfloat16: one rounding of the output (2^-8) and, in the backward,
# of the pre-scaled cotangent or dequantized weights.
TOLERANCE = {"float32": 2e-5, "bfloat16": 1.5e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  """One problem; tile sizes are per backend (TPU and Triton rules differ)."""

  name: str
  kind: str  # int8 | int4 | int8_int8
  lead: tuple  # Leading dims of x (their product is M).
  k: int
  n: int
  group: int
  scaled: bool  # int8_int8 only: with row/column scales (float out) or raw int32.
  tpu_blocks: BlockSizes | None
  gpu_blocks: BlockSizes | None

  def __str__(self):
    return self.name


CASES = {
  c.name: c
  for c in (
    # Several tiles in every dim, all three padded (M = 38, N = 200, K = 320 vs 32/128/128 tiles).
    Case("int8_ragged_tiles", "int8", (2, 19), 320, 200, 0, True, BlockSizes(32, 128, 128), BlockSizes(16, 64, 64)),
    # int4, group 32: eight groups per 256-wide K tile, two K tiles; two groups per GPU tile.
    Case("int4_g32_two_k_tiles", "int4", (37,), 512, 256, 32, True, BlockSizes(32, 128, 256), BlockSizes(16, 64, 64)),
    # int4, group 128, K = 384 padded to two 256-wide TPU tiles (zero groups in the padding).
    Case("int4_g128_padded_k", "int4", (3, 7), 384, 136, 128, True, BlockSizes(32, 128, 256), BlockSizes(32, 32, 128)),
    # Decode-like: default tiles, every dim one full tile on TPU.
    Case("int4_g64_decode_defaults", "int4", (5,), 192, 96, 64, True, None, None),
    # W8A8 with row/column scales, and the raw int32 accumulator.
    Case("w8a8_scaled", "int8_int8", (40,), 200, 130, 0, True, BlockSizes(32, 128, 128), BlockSizes(16, 64, 64)),
    Case("w8a8_int32", "int8_int8", (2, 9), 256, 128, 0, False, BlockSizes(32, 128, 128), None),
  )
}  # fmt: skip


def weights(case: Case, seed: int = 0):
  """(w_float [K, N], quantized weights, scales) for the case's kind."""
  w = jax.random.normal(jax.random.key(seed + 100), (case.k, case.n), jnp.float32)
  if case.kind == "int4":
    return (w, *quantize_int4(w, case.group))
  return (w, *quantize_int8(w))


def inputs(case: Case, dtype: str, seed: int = 0):
  """(x, w_q, scales, x_scale or None) and a cotangent for the output."""
  keys = jax.random.split(jax.random.key(seed), 2)
  x = jax.random.normal(keys[0], (*case.lead, case.k), jnp.float32)
  _, w_q, scales = weights(case, seed)
  out_dtype = dtype
  if case.kind == "int8_int8":
    x_q, x_scale = quantize_rows_int8(x)
    out_dtype = "float32" if case.scaled else "int32"
    args = (x_q, w_q, scales, x_scale) if case.scaled else (x_q, w_q, None, None)
  else:
    args = (x.astype(dtype), w_q, scales, None)
  g = jax.random.normal(keys[1], (*case.lead, case.n), jnp.float32)
  return args, g.astype(out_dtype) if out_dtype != "int32" else None


def call(case: Case, args, *, implementation, interpret=False, blocks=None):
  x, w_q, scales, x_scale = args
  common = dict(block_sizes=blocks, implementation=implementation, interpret=interpret)
  if case.kind == "int8":
    return int8_matmul(x, w_q, scales, **common)
  if case.kind == "int4":
    return int4_matmul(x, w_q, scales, group_size=case.group, **common)
  return int8_int8_matmul(x, w_q, x_scale, scales, **common)


def reference(case: Case, args):
  """The float32 HIGHEST reference on float32-upcast activations."""
  x, w_q, scales, x_scale = args
  if case.kind == "int8":
    return ref_lib.int8_matmul(x.astype(jnp.float32), w_q, scales)
  if case.kind == "int4":
    return ref_lib.int4_matmul(x.astype(jnp.float32), w_q, scales, group_size=case.group)
  return ref_lib.int8_int8_matmul(x, w_q, x_scale, scales)


def runner(case: Case, fn):
  """jit(args, g) -> (out, dx or None): the output and, for float kinds, the VJP w.r.t. x."""

  @jax.jit
  def run(args, g):
    if case.kind == "int8_int8":
      return fn(args), None
    out, vjp = jax.vjp(lambda x: fn((x, *args[1:])), args[0])
    return out, vjp(g)[0]

  return run


def kernel_runner(case: Case, implementation: str, interpret, blocks):
  return runner(
    case,
    functools.partial(
      call, case, implementation=implementation, interpret=interpret, blocks=blocks
    ),
  )


def reference_results(case: Case, dtype: str):
  args, g = inputs(case, dtype)
  if case.kind != "int8_int8":
    args = (args[0].astype(jnp.float32), *args[1:])
    g = g.astype(jnp.float32)
  return runner(case, functools.partial(reference, case))(args, g)


def assert_close(got, want, dtype: str, what: str = ""):
  """|got - want| <= tol * max(1, max |want|) elementwise; integers must be equal."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  if np.issubdtype(want.dtype, np.integer):
    np.testing.assert_array_equal(got, want, err_msg=what)
    return
  got, want = got.astype(np.float32), want.astype(np.float32)
  assert np.isfinite(got).all(), f"{what}: non-finite values"
  tol = TOLERANCE[dtype] * max(1.0, float(np.abs(want).max(initial=0.0)))
  np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=what)


# ----------------------------------------------------------------------------- TPU semantics


def races_found() -> bool:
  """The TPU simulator's race flag (a private global of jax's interpreter)."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # noqa: PLC0415

  races = interpret_pallas_call.races
  return bool(races is not None and races.races_found)


@contextlib.contextmanager
def tpu_simulator(seed: int):
  """TPU pallas_calls inside run in jax's TPU simulator (NaN-filled uninitialised memory, two cores
  on the "parallel" axes in a random order, race detection); its state is reset afterwards."""
  params = pltpu.InterpretParams(
    uninitialized_memory="nan",
    detect_races=True,
    num_cores_or_threads=2,
    random_seed=seed,
    out_of_bounds_reads="raise",
  )
  pltpu.reset_tpu_interpret_mode_state()
  try:
    with pltpu.force_tpu_interpret_mode(params):
      yield
  finally:
    pltpu.reset_tpu_interpret_mode_state()


# ------------------------------------------------------------------------ lowering / compiling

H100 = jax.sharding.AbstractDevice("NVIDIA H100 80GB HBM3", 132, "cuda")
TRITON_CALL = "__gpu$xla.gpu.triton"


def export_text(fn, args, platform: str) -> str:
  """StableHLO text of `jax.export` of jit(fn) for one platform (CUDA under an abstract H100, with
  the Triton custom call allowed: Triton IR has no stability guarantee, so never archive it)."""
  if platform != "cuda":
    return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
  exporter = jax.export.export(
    jax.jit(fn),
    platforms=["cuda"],
    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
  )
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100)):
    return exporter(*args).mlir_module()


def has_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def compile_for_tpu(fn, args, topology: str = "v5e:2x2"):
  """jit(fn) compiled by libtpu for one chip of a TPU topology (no TPU needed). Another process
  using libtpu (e.g. a parallel test worker) holds its lockfile; compiling needs no exclusive
  access to a chip, so this process skips the lock."""
  from jax.experimental import topologies  # noqa: PLC0415

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

  device = topologies.get_topology_desc(topology, platform="tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("x",))):
    return jax.jit(fn).trace(*args).lower().compile()

"""Shared pieces of the flash-attention kernel tests: the case grid, inputs, the forward + VJP
runner, dtype-scaled comparisons, the TPU simulator context, export and AOT helpers."""

import contextlib
import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from reslm.kernels_pallas.flash_attention import BlockSizes, flash_attention, reference

# Max error allowed, relative to max(1, max |expected|); the interpret runs observe ~1e-6 (float32)
# and ~1e-2 (bfloat16, inputs and outputs rounded) against the float32 HIGHEST reference.
TOLERANCE = {"float32": 2e-5, "bfloat16": 3e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  """One shape/mask configuration; tile sizes are chosen per backend (TPU/GPU rules differ)."""

  name: str
  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  causal: bool
  segments: bool
  tpu_blocks: BlockSizes
  gpu_blocks: BlockSizes

  def __str__(self):
    return self.name


CASES = {
  c.name: c
  for c in (
    # Several kv tiles: causal skipping, index-map clamping, a padded last tile, GQA ratio 2.
    Case("causal_gqa2_ragged", 2, 260, 260, 4, 2, 32, True, False, BlockSizes(64, 128), BlockSizes(64, 64)),
    # Packed segments with padding (id 0), one kv head per query head, kv_len not a tile multiple.
    Case("bidir_mha_segments", 2, 130, 130, 2, 2, 64, False, True, BlockSizes(32, 128), BlockSizes(64, 64)),
    # All query heads on one kv head (ratio 4 = "all"), cross lengths, a query segment absent from
    # the keys (rows that see nothing), two head blocks per group on TPU.
    Case("causal_mqa_cross_segments", 1, 72, 200, 4, 1, 32, True, True,
         BlockSizes(16, 128, heads_per_block=2), BlockSizes(64, 64)),
    # More queries than keys (top-left causal: late rows see every key).
    Case("causal_more_queries", 1, 150, 40, 2, 1, 16, True, False, BlockSizes(32, 128), BlockSizes(64, 64)),
    # Exact tile multiples, backward tiles different from the forward ones.
    Case("bidir_exact_bwd_tiles", 1, 256, 256, 2, 1, 128, False, False,
         BlockSizes(128, 256, block_q_bwd=64, block_kv_bwd=128), BlockSizes(128, 128, 64, 64)),
  )
}  # fmt: skip


def segment_ids(case: Case):
  """(q_ids, kv_ids) or None. Equal lengths: packed sequences 1, 2 then padding 0 (the second batch
  row rolled). Cross lengths: the keys hold segments 1, 2 early and padding after; the queries' last
  segment, 3, has no key, so those rows see nothing."""
  if not case.segments:
    return None

  def ids(n, cuts, last):
    row = np.full(n, last)
    row[: int(cuts[1] * n)] = 2
    row[: int(cuts[0] * n)] = 1
    return row

  q = ids(case.q_len, (1 / 3, 4 / 5), 0 if case.q_len == case.kv_len else 3)
  q = jnp.asarray(np.stack([q, np.roll(q, 5)][: case.batch]), jnp.int32)
  if case.q_len == case.kv_len:
    return q, q
  kv = ids(case.kv_len, (1 / 10, 3 / 10), 0)
  return q, jnp.asarray(np.stack([kv] * case.batch), jnp.int32)


def inputs(case: Case, dtype: str, seed: int = 0):
  """(q, k, v), cotangents (d_out, d_lse), segment ids."""
  rng = np.random.default_rng(seed)
  q_shape = (case.batch, case.q_len, case.heads, case.head_dim)
  kv_shape = (case.batch, case.kv_len, case.kv_heads, case.head_dim)

  def normal(shape, dtype=dtype):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

  q, k, v, d_out = normal(q_shape), normal(kv_shape), normal(kv_shape), normal(q_shape)
  d_lse = normal(q_shape[:3], jnp.float32)
  return (q, k, v), (d_out, d_lse), segment_ids(case)


def runner(attend):
  """jit(args, cotangents) -> ((out, lse), (dq, dk, dv)) for attend(q, k, v) -> (out, lse)."""

  @jax.jit
  def run(args, cotangents):
    primals, vjp = jax.vjp(attend, *args)
    return primals, vjp(cotangents)

  return run


def kernel_runner(case: Case, implementation: str, interpret, blocks: BlockSizes | None):
  segs = segment_ids(case)
  return runner(
    lambda q, k, v: flash_attention(
      q,
      k,
      v,
      segment_ids=segs,
      causal=case.causal,
      block_sizes=blocks,
      implementation=implementation,
      interpret=interpret,
      return_lse=True,
    )
  )


def reference_results(case: Case, dtype: str):
  """The float32 HIGHEST reference on the (upcast) inputs of `dtype`."""
  args, (d_out, d_lse), segs = inputs(case, dtype)
  up = tuple(x.astype(jnp.float32) for x in args)
  q_seg, kv_seg = segs if segs is not None else (None, None)
  run = runner(
    lambda q, k, v: reference(
      q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=case.causal
    )
  )
  return run(up, (d_out.astype(jnp.float32), d_lse))


def assert_close(got, want, dtype: str, what: str = ""):
  """Elementwise |got - want| <= tol * max(1, max |want|); non-finite entries must match."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  finite = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=f"{what}: non-finite pattern")
  np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=f"{what}: non-finite values")
  scale = max(1.0, float(np.abs(want[finite]).max(initial=0.0)))
  tol = TOLERANCE[dtype] * scale
  np.testing.assert_allclose(got[finite], want[finite], atol=tol, rtol=0, err_msg=what)


# ----------------------------------------------------------------------------- TPU semantics


def races_found() -> bool:
  """The TPU simulator's race flag (a private global of jax's interpreter)."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # noqa: PLC0415

  races = interpret_pallas_call.races
  return bool(races is not None and races.races_found)


@contextlib.contextmanager
def tpu_simulator(seed: int):
  """Every TPU pallas_call inside runs in the TPU simulator: NaN-filled uninitialised memory, two
  cores sharing the "parallel" axes in a random order, race detection; the simulator's global
  state is reset afterwards, also after a failure."""
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


def export_text(fn, args, platform: str) -> str:
  """StableHLO text of `jax.export` of jit(fn) for one platform (CUDA under an abstract H100)."""
  exporter = jax.export.export(jax.jit(fn), platforms=[platform])
  if platform == "cuda":
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=H100)
    with jax.sharding.use_abstract_mesh(mesh):
      return exporter(*args).mlir_module()
  return exporter(*args).mlir_module()


def has_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None

"""Rung 5 of the kernel ladder: the cost model.

Every TPU kernel hands XLA a `pl.CostEstimate` (FLOPs, transcendentals, HBM bytes) derived from its
tiling; XLA schedules with it and builds its static roofline (`optimal_seconds`) from it (a kernel
without one would count as free). These tests read the estimates back from the TPU lowering, as XLA
receives them, and check them
  1. against `pl.estimate_cost(reference, ...)`: a walk over the jnp definition's jaxpr (dot and
     elementwise FLOPs; bytes = inputs + outputs once, i.e. the minimum HBM traffic). A kernel may
     do more work than the definition (whole tiles across the causal diagonal or an expert
     boundary, a backward that recomputes scores) and move more bytes (tiles re-read per output
     tile, lane-replicated row statistics). Each test derives that factor from the tile grid,
     independently of the kernel code, and states the tolerance for what the jaxpr walk counts on
     top (softmax and dequantization elementwise ops);
  2. against XLA's `cost_analysis()` of a real libtpu compile for a v5e chip (rung 4):
     `optimal_seconds` (corrected for ConcatBitcast) must be our estimate's roofline plus the
     roofline of the XLA glue around the kernel (layout transposes, padding, slicing), within XLA's
     own HBM efficiency.
"""

import importlib
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from experiments.benchmarks.kernels import (
  compile_for,
  kernel_costs,
  total,
  tpu_device,
  xla_estimate,
)
from reslm.kernels_pallas.flash_attention import BlockSizes, flash_attention
from reslm.kernels_pallas.flash_attention import reference as flash_reference
from reslm.kernels_pallas.paged_attention import paged_attention
from reslm.kernels_pallas.quant_matmul import int4_matmul, int8_int8_matmul, int8_matmul
from reslm.kernels_pallas.ragged_matmul import ragged_matmul

quant_reference = importlib.import_module("reslm.kernels_pallas.quant_matmul.reference")
ragged_reference = importlib.import_module("reslm.kernels_pallas.ragged_matmul.reference")
paged_reference = importlib.import_module("reslm.kernels_pallas.paged_attention.reference")

sd = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
LANES = 128


def nbytes(*structs) -> int:
  return sum(int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize for s in structs)


# -------------------------------------------------------------------------------- flash attention

B, S, H, HK, D = 1, 2048, 8, 2, 128
BQ, BK, HEADS_PER_BLOCK = 256, 512, 2  # Two head blocks per kv group of 4 query heads.
NQ, NK, NH = S // BQ, S // BK, (H // HK) // HEADS_PER_BLOCK
FLASH_BLOCKS = BlockSizes(block_q=BQ, block_kv=BK, heads_per_block=HEADS_PER_BLOCK)


def flash_args():
  return sd((B, S, H, D), BF16), sd((B, S, HK, D), BF16), sd((B, S, HK, D), BF16)


def work_tiles(causal: bool) -> np.ndarray:
  """[NQ, NK] bool: the tiles holding at least one visible (query, key) pair."""
  rows, cols = np.arange(S)[:, None], np.arange(S)[None, :]
  visible = cols <= rows if causal else np.ones((S, S), bool)
  return visible.reshape(NQ, BQ, NK, BK).any(axis=(1, 3))


def flash(causal: bool):
  return lambda q, k, v: flash_attention(
    q, k, v, causal=causal, block_sizes=FLASH_BLOCKS, implementation="tpu"
  )


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_flash_forward_estimate(causal):
  args = flash_args()
  kernel = kernel_costs(flash(causal), args)["flash_attention_fwd"]
  ref = pl.estimate_cost(lambda q, k, v: flash_reference(q, k, v, causal=causal), *args)
  work = work_tiles(causal)
  computed = work.sum() * BQ * BK / (S * S)  # Causal: 20 of 32 tiles, not 1/2 (whole tiles).
  # FLOPs: the kernel counts the two matmuls of every tile with work (a diagonal tile in full); the
  # jaxpr walk also counts the softmax's ~5 elementwise ops per score against 4 * D = 512.
  assert kernel.flops == pytest.approx(ref.flops * computed, rel=0.02)
  # One exp per computed score (the reference adds one log per row).
  assert kernel.transcendentals == pytest.approx(ref.transcendentals * computed, rel=0.01)
  # Bytes: q read and out written once, as in the reference; a K/V tile read once per tile with
  # work and head block (a skipped causal tile re-addresses the resident one: no DMA); lse written
  # as 128 lane-replicated float32 per row instead of one.
  kv_bytes, lse_bytes = nbytes(*args[1:]), B * S * H * 4
  kv_reads = NH * work.sum() / NK
  expected = ref.bytes_accessed + (kv_reads - 1) * kv_bytes + (LANES - 1) * lse_bytes
  assert kernel.bytes_accessed == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_flash_backward_estimates(causal):
  args = flash_args()
  loss = lambda *a: flash(causal)(*a).astype(jnp.float32).sum()
  costs = kernel_costs(jax.grad(loss, argnums=(0, 1, 2)), args)

  def reference_vjp(q, k, v, d_out, d_lse):
    _, vjp = jax.vjp(lambda *a: flash_reference(*a, causal=causal), q, k, v)
    return vjp((d_out, d_lse))

  ref = pl.estimate_cost(reference_vjp, *args, args[0], sd((B, S, H), jnp.float32))
  work = work_tiles(causal)
  computed = work.sum() * BQ * BK / (S * S)
  # Autodiff of the reference: 2 score-sized matmuls forward + 4 backward (dV, dP, dQ, dK). The
  # kernels: forward 2, dq 3 (S, dP again, dQ), dk/dv 4 (S, dP again, dV, dK) = 9, i.e. 1.5x;
  # every kernel recomputes exp(S - lse) where autodiff reuses the forward's probabilities.
  assert total(costs).flops == pytest.approx(1.5 * computed * ref.flops, rel=0.03)
  assert total(costs).transcendentals == pytest.approx(3 * computed * ref.transcendentals, rel=0.01)
  q_bytes, kv_bytes = nbytes(args[0]), nbytes(*args[1:])
  row_stat = B * S * H * LANES * 4  # lse or D = rowsum(dO * O), lane-replicated float32.
  # dq: q and dO read, dQ written once; K/V as in the forward; lse and D read once.
  dq = costs["flash_attention_dq"].bytes_accessed
  assert dq == pytest.approx(3 * q_bytes + NH * work.sum() / NK * kv_bytes + 2 * row_stat, rel=1e-3)
  # dk/dv: K, V read and dK, dV written once; for each kv tile, the query-side tiles (q, dO, lse,
  # D) from the first query tile that sees it onwards (at least one is fetched).
  fetches = np.maximum(work.sum(axis=0), 1).sum()
  expected = 2 * kv_bytes + fetches / NQ * (2 * q_bytes + 2 * row_stat)
  assert costs["flash_attention_dkv"].bytes_accessed == pytest.approx(expected, rel=1e-3)


# ----------------------------------------------------------------------------- low-bit matmuls

K_DIM = N_DIM = 2048
TILE_M, TILE_N, TILE_K = 256, 256, 512  # The TPU defaults.


def quant_case(kind: str, m: int, k_dim: int = K_DIM):
  """(kernel fn, reference fn, abstract args)."""
  if kind == "int8":
    args = (sd((m, k_dim), BF16), sd((k_dim, N_DIM), jnp.int8), sd((N_DIM,), jnp.float32))
    return (
      lambda x, w, s: int8_matmul(x, w, s, implementation="tpu"),
      quant_reference.int8_matmul,
      args,
    )
  if kind == "int4":
    args = (sd((m, k_dim), BF16), sd((k_dim // 2, N_DIM), jnp.int8))
    args += (sd((k_dim // 128, N_DIM), jnp.float32),)
    return (
      lambda x, w, s: int4_matmul(x, w, s, group_size=128, implementation="tpu"),
      lambda x, w, s: quant_reference.int4_matmul(x, w, s, group_size=128),
      args,
    )
  args = (sd((m, k_dim), jnp.int8), sd((k_dim, N_DIM), jnp.int8))
  args += (sd((m,), jnp.float32), sd((N_DIM,), jnp.float32))
  return (
    lambda *a: int8_int8_matmul(*a, implementation="tpu"),
    quant_reference.int8_int8_matmul,
    args,
  )


@pytest.mark.parametrize(
  ("kind", "m", "k_dim"),
  [("int8", 16, K_DIM), ("int8", 512, K_DIM), ("int8", 512, 512), ("int4", 16, K_DIM),
   ("int4", 512, K_DIM), ("w8a8", 512, K_DIM)],
)  # fmt: skip
def test_quant_matmul_estimate(kind, m, k_dim):
  kernel_fn, reference_fn, args = quant_case(kind, m, k_dim)
  (kernel,) = kernel_costs(kernel_fn, args).values()
  ref = pl.estimate_cost(reference_fn, *args)
  # FLOPs: the kernel counts the MXU product 2MKN; the reference also scales the output (MN, W8A8
  # 2MN) and, for int4, dequantizes every weight once (KN multiplies = 1 / (2M) of the product).
  tolerance = 0.01 + (1 / (2 * m) if kind == "int4" else 0)
  assert kernel.flops == 2 * m * k_dim * N_DIM
  assert kernel.flops == pytest.approx(ref.flops, rel=tolerance)
  # Bytes (int4 weights count their packed 0.5 byte, as in the reference): x is re-read for every
  # N tile unless K is a single tile (its block then stays resident), the weight-side inputs
  # (weights, scales) for every M tile; the output is written once.
  grid_m, grid_n = -(-m // TILE_M), N_DIM // TILE_N if k_dim > TILE_K else 1
  x_bytes, w_bytes = nbytes(args[0]), nbytes(*args[1:])
  if kind == "int4":
    assert nbytes(args[1]) == k_dim * N_DIM // 2
  expected = ref.bytes_accessed + (grid_n - 1) * x_bytes + (grid_m - 1) * w_bytes
  assert kernel.bytes_accessed == pytest.approx(expected, rel=1e-3)


# -------------------------------------------------------------------------- grouped matmul (MoE)

M, KR, NR, G = 2048, 1024, 512, 8
RAGGED_TILES = dict(block_m=128, block_k=512, block_n=256)  # TPU defaults at this shape.


def ragged_args():
  return sd((M, KR), BF16), sd((G, KR, NR), BF16), sd((G,), jnp.int32)


def test_ragged_matmul_estimates():
  args = ragged_args()
  costs = kernel_costs(lambda *a: ragged_matmul(*a, implementation="tpu"), args)
  kernel = costs["ragged_matmul"]
  ref = pl.estimate_cost(ragged_reference.ragged_matmul, *args)
  # pl.estimate_cost has no rule for ragged_dot (it counts 0 FLOPs): a dense [M, K] x [K, N]
  # product stands in, as every row meets exactly one group's matrix.
  dense = pl.estimate_cost(lambda lhs, rhs, sizes: lhs @ rhs[0], *args)
  assert ref.flops in (0, pytest.approx(dense.flops, rel=0.01))
  assert dense.bytes_accessed == ref.bytes_accessed
  # A row tile holding rows of two groups is visited once per group and computed whole: with the
  # group boundaries inside tiles (the usual case) there are tiles + G - 1 visits.
  bm, bk, bn = RAGGED_TILES["block_m"], RAGGED_TILES["block_k"], RAGGED_TILES["block_n"]
  visits = M // bm + G - 1
  assert kernel.flops == pytest.approx(dense.flops * visits * bm / M, rel=1e-3)
  # Bytes: K is the innermost grid axis, so each visit reads its lhs strip again for every N tile
  # and its group's whole K x N_tile weight strip again; the output is written once.
  x_bytes, w_bytes, sizes_bytes = nbytes(*args[:1]), nbytes(args[1]), nbytes(args[2])
  assert bk < KR
  expected = (
    ref.bytes_accessed
    - sizes_bytes
    + (visits * bm * (NR // bn) / M - 1) * x_bytes
    + (visits / G - 1) * w_bytes
  )
  assert kernel.bytes_accessed == pytest.approx(expected, rel=1e-3)
  # Gradients: d lhs and d rhs each redo the forward's tile work.
  loss = lambda *a: ragged_matmul(*a, implementation="tpu").astype(jnp.float32).sum()
  grads = kernel_costs(jax.grad(loss, argnums=(0, 1)), args)
  for name in ("ragged_matmul_dlhs", "ragged_matmul_drhs"):
    assert grads[name].flops == pytest.approx(kernel.flops, rel=1e-3), name


# --------------------------------------------------------------------------- paged attention

PB, PH, PHK, PD, PAGE, PAGES_PER_SEQ = 8, 32, 8, 128, 32, 64


def paged_args(kv_dtype):
  pool = (PHK, PB * PAGES_PER_SEQ, PAGE, PD)  # Exactly every sequence's capacity.
  args = [sd((PB, PH, PD), BF16), sd(pool, kv_dtype), sd(pool, kv_dtype)]
  args += [sd((PB,), jnp.int32), sd((PB, PAGES_PER_SEQ), jnp.int32)]
  if kv_dtype == jnp.int8:
    args += [sd(pool[:3], jnp.float32)] * 2
  return tuple(args)


def paged(implementation):
  def attend(q, k, v, lengths, tables, *scales):
    k_scale, v_scale = scales or (None, None)
    if implementation == "reference":
      return paged_reference.paged_attention(
        q, k, v, lengths, tables, k_scale=k_scale, v_scale=v_scale
      )
    return paged_attention(
      q, k, v, lengths, tables, k_scale=k_scale, v_scale=v_scale, implementation=implementation
    )

  return attend


@pytest.mark.parametrize("kv_dtype", [BF16, jnp.int8], ids=["bf16", "int8"])
def test_paged_attention_estimate(kv_dtype):
  args = paged_args(kv_dtype)
  (kernel,) = kernel_costs(paged("tpu"), args).values()
  ref = pl.estimate_cost(paged("reference"), *args)
  tokens = PAGES_PER_SEQ * PAGE
  # FLOPs: 4 * d per (query head, cached token); the reference adds the softmax's elementwise ops
  # and, for int8 pages, dequantizes the gathered keys and values (2 * B * Hkv * L * d multiplies;
  # the kernel converts in VMEM, which its estimate does not count).
  dequant = 2 * PB * PHK * tokens * PD if kv_dtype == jnp.int8 else 0
  assert kernel.flops == 4 * PB * PH * tokens * PD
  assert kernel.flops == pytest.approx(ref.flops - dequant, rel=0.02)
  assert kernel.transcendentals == pytest.approx(ref.transcendentals, rel=0.01)
  # Bytes: every page of each sequence's capacity is counted (the lengths are runtime values, so
  # this is the upper bound), i.e. the whole pool here, plus query, block table and output: the
  # reference's inputs and output except the lengths.
  assert kernel.bytes_accessed == ref.bytes_accessed - nbytes(args[3])


# ------------------------------------------------------------ XLA's cost model of the compiles

XLA_CASES = {
  "flash_fwd": lambda: (
    flash(True),
    (sd((1, 1024, 8, 128), BF16), *[sd((1, 1024, 2, 128), BF16)] * 2),
  ),
  "int8_matmul": lambda: quant_case("int8", 256)[::2],
  "int4_matmul": lambda: quant_case("int4", 256)[::2],
  "ragged_matmul": lambda: (lambda *a: ragged_matmul(*a, implementation="tpu"), ragged_args()),
  "paged_attention": lambda: (paged("tpu"), paged_args(BF16)),
}
# XLA's v5e model takes the MXU at its full 197 TFLOP/s but HBM at ~90% of 820 GB/s (measured:
# a kernel with only bytes gets 1.11 x bytes / bandwidth), so an estimate sits between our
# roofline and 1 / 0.85 of it.
HBM_EFFICIENCY_FLOOR = 0.85


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (jax[tpu])")
@pytest.mark.parametrize("case", list(XLA_CASES))
def test_xla_optimal_seconds_is_the_estimate_roofline_plus_glue(case):
  fn, args = XLA_CASES[case]()
  device = tpu_device("v5e:2x2")
  xla = xla_estimate(compile_for(device, fn, args))
  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("x",))):
    info = pltpu.get_tpu_info()
  peak, bandwidth = info.bf16_ops_per_second, info.mem_bw_bytes_per_second
  ours = total(kernel_costs(fn, args))
  # XLA adds our FLOPs and bytes to those of the glue ops around the kernel (no matmuls there).
  assert xla["flops"] == pytest.approx(ours.flops, rel=1e-3)
  glue_bytes = xla["bytes"] - ours.bytes_accessed
  assert glue_bytes >= 0
  floor = max(ours.flops / peak, ours.bytes_accessed / bandwidth) + glue_bytes / bandwidth
  assert floor * (1 - 1e-3) <= xla["optimal_seconds"] <= floor / HBM_EFFICIENCY_FLOOR

"""Megatron sequence parallelism's communication on TPU: one reduce-scatter per block output and
one all-gather per block input along the sequence, forward and backward (compiled with libtpu for
a v5e:2x4 slice; XLA:CPU rewrites reduce-scatters, so the CPU test in test_strategies checks the
numerics and the gathers only)."""

import numpy as np
import pytest

from reslm.models import ModelConfig
from reslm.parallel import comm
from reslm.parallel import mesh as mesh_lib
from reslm.training import aot
from tests.parallel.common import train_config

BATCH, SEQ, D, LAYERS = 16, 128, 256, 2


def compile_dp_tp(sequence_parallel: bool):
  pytest.importorskip("libtpu", reason="needs the libtpu wheel (jax[tpu])")
  from reslm.parallel import aot as aot_lib  # noqa: PLC0415

  devices, _, _ = aot_lib.tpu_devices("v5e:2x4")
  model = ModelConfig(
    vocab_size=1024, d_model=D, num_layers=LAYERS, num_heads=8, mlp_dim=1024, max_seq_len=SEQ,
    tie_embeddings=False,
  )  # fmt: skip
  pcfg = mesh_lib.get_default_config()
  pcfg.update(data=2, tensor=4, rules="dp_tp", sequence_parallel=sequence_parallel)
  mesh = mesh_lib.make_mesh(pcfg, devices)
  example = {
    "inputs": np.zeros((BATCH, SEQ), np.int32),
    "targets": np.zeros((BATCH, SEQ), np.int32),
    "weights": np.ones((BATCH, SEQ), np.float32),
  }
  return comm.parse_hlo(aot.compile_step(model, train_config(), pcfg, mesh, example).as_text())


def test_block_outputs_are_reduce_scattered_along_the_sequence():
  """Each block's two row-parallel outputs (attention out, MLP down) are reduce-scattered over the
  tensor group of 4, forward (their psum_scatter) and backward (the transposed input gathers); no
  [rows, seq, d] activation is all-reduced or exchanged all-to-all, as XLA did from sharding
  constraints alone. Without sequence parallelism the same outputs are all-reduced."""
  rows = BATCH // 2  # The data-parallel half of the batch on each tensor group.
  act = rows * SEQ * D * 4  # One float32 [rows, seq, d] activation (its unscattered bytes).
  ops = compile_dp_tp(True)
  scatters = [op for op in ops if op.kind == "reduce-scatter" and op.bytes == act]
  assert sum(op.count for op in scatters) >= 4 * LAYERS
  assert all(op.group_size == 4 for op in scatters)
  whole = [  # Over the tensor group (weight gradients are all-reduced over the data pairs).
    op
    for op in ops
    if op.kind in ("all-reduce", "all-to-all") and op.group_size == 4 and op.bytes >= act / 4
  ]
  assert not whole, whole
  gathers = [op for op in ops if op.kind == "all-gather" and op.group_size == 4 and op.count]
  assert sum(op.count for op in gathers if op.bytes >= act / 2) >= 4 * LAYERS
  baseline = compile_dp_tp(False)
  reduced = [op for op in baseline if op.kind == "all-reduce" and op.bytes == act]
  assert sum(op.count for op in reduced) >= 4 * LAYERS

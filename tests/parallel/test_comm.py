"""Collective bytes from HLO text, checked against hand-computed sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from reslm.parallel import comm


def test_shard_map_program_bytes_match_hand_computed():
  mesh = Mesh(np.array(jax.devices()), ("x",))
  n = mesh.size

  def body(x):  # Local x: [2, 16] float32 = 128 bytes.
    summed = jax.lax.psum(x, "x")  # all-reduce: 128 B.
    gathered = jax.lax.all_gather(x, "x", tiled=True)  # all-gather: [2n, 16] out = 128n B.
    scattered = jax.lax.psum_scatter(gathered, "x", tiled=True)  # reduce-scatter: 128n B in.
    swapped = jax.lax.all_to_all(gathered, "x", 0, 0, tiled=True)  # all-to-all: 128n B.
    shifted = jax.lax.ppermute(x, "x", [(i, (i + 1) % n) for i in range(n)])  # permute: 128 B.

    def step(_, c):  # 3 iterations x all-reduce of 128 B.
      return jax.lax.pcast(jax.lax.psum(c * 1.5, "x"), "x", to="varying")

    looped = jax.lax.fori_loop(0, 3, step, x)
    return summed + scattered + swapped[:2] + shifted + looped

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
  found = comm.comm_bytes(f.lower(jnp.ones((2 * n, 16))).compile())
  assert found["bytes"] == {
    "all-reduce": 4 * 128,
    "all-gather": 128 * n,
    "reduce-scatter": 128 * n,
    "all-to-all": 128 * n,
    "collective-permute": 128,
  }
  assert found["ops"]["all-reduce"] == 4
  ring = (n - 1) / n
  assert found["link_bytes"]["all-reduce"] == pytest.approx(2 * ring * 4 * 128)
  assert found["link_bytes"]["all-gather"] == pytest.approx(ring * 128 * n)
  assert found["link_bytes"]["collective-permute"] == 128


# Async pairs, tuple shapes, bf16, the replica-group notations, a loop with XLA's trip count and
# one without (as TPU HLO prints loops: the count is the condition's `i < 3`).
HLO = """HloModule m, num_partitions=8

%body.1 (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]) parameter(0)
  %ars = bf16[4,8]{1,0} all-reduce-start(%x), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %ard = bf16[4,8]{1,0} all-reduce-done(%ars)
  ROOT %t = (s32[], bf16[4,8]) tuple(%i, %ard)
}

%cond.1 (p: (s32[], bf16[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%body.2 (q: (s32[], f32[8])) -> (s32[], f32[8]) {
  %q = (s32[], f32[8]) parameter(0)
  %ar2 = f32[8]{0} all-reduce(%y), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  ROOT %t2 = (s32[], f32[8]) tuple(%j, %ar2)
}

%cond.2 (q: (s32[], f32[8])) -> pred[] {
  %limit = s32[]{:T(128)} constant(3)
  %q = (s32[], f32[8]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %limit), direction=LT
}

ENTRY %main (a: f32[16,8]) -> f32[16,8] {
  %ags = (f32[2,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%a), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = f32[16,8]{1,0} all-gather-done(%ags)
  %ar = (f32[16,8]{1,0}, f32[8]{0}) all-reduce(%agd, %b), replica_groups={}, to_apply=%add
  %rs = f32[4,8]{1,0:T(8,128)} reduce-scatter(%agd), replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}, dimensions={0}
  %cps = (f32[16,8]{1,0}, f32[16,8]{1,0}, u32[], u32[]) collective-permute-start(%agd), source_target_pairs={{0,1}}
  %cpd = f32[16,8]{1,0} collective-permute-done(%cps)
  %w = (s32[], bf16[4,8]) while(%init), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"5"}}
  %w2 = (s32[], f32[8]) while(%init2), condition=%cond.2, body=%body.2
  ROOT %r = f32[16,8]{1,0} add(%cpd, %agd)
}
"""


def test_parser_counts_async_pairs_once_and_multiplies_loops():
  found = comm.comm_bytes(HLO)
  assert found["bytes"] == {
    # Tuple operands + 5 loop trips of bf16 + 3 trips of f32[8].
    "all-reduce": 16 * 8 * 4 + 8 * 4 + 5 * (4 * 8 * 2) + 3 * 8 * 4,
    "all-gather": 16 * 8 * 4,  # The gathered output of the start's (operand, output) tuple.
    "reduce-scatter": 4 * 8 * 4 * 4,  # Output shard x the 4 devices of the fsdp group.
    "all-to-all": 0,
    "collective-permute": 16 * 8 * 4,  # The operand only, not the context scalars.
  }
  assert found["ops"] == {
    "all-reduce": 9,
    "all-gather": 1,
    "reduce-scatter": 1,
    "all-to-all": 0,
    "collective-permute": 1,
  }
  groups = {op.name: op.group_size for op in comm.parse_hlo(HLO)}
  assert groups == {"ars": 4, "ags": 8, "ar": 8, "rs": 4, "cps": 8, "ar2": 2}


# TPU's overlap of a collective with a loop (a weight gather riding a windowed-einsum loop of 8
# iterations, itself in a scan of 2 layers): the async collective fusion carries its progress
# through the iterations and runs once per loop; the collective-permute of the ring runs every
# iteration.
STEPPED_HLO = """HloModule m, num_partitions=16

%async_collective_fusion.7 (p0: bf16[256,8]) -> (bf16[256,8], bf16[4096,8], u32[]) {
  %p0 = bf16[256,8] parameter(0)
  %ag = bf16[4096,8]{1,0} all-gather(%p0), replica_groups=mesh['axis_0'=16] {'axis_0'}, dimensions={0}
  ROOT %t = (bf16[256,8], bf16[4096,8], u32[]) tuple(%p0, %ag, %s)
}

%windowed_body (w: (u32[], bf16[256,8])) -> (u32[], bf16[256,8]) {
  %w = (u32[], bf16[256,8]) parameter(0)
  %cp = bf16[256,8]{1,0} collective-permute(%x), source_target_pairs={{0,1}}
  %f = (bf16[256,8], bf16[4096,8], u32[]) fusion(%x), kind=kCustom, calls=%async_collective_fusion.7
  ROOT %r = (u32[], bf16[256,8]) tuple(%i, %cp)
}

%windowed_cond (w: (u32[], bf16[256,8])) -> pred[] {
  %limit = u32[]{:T(128)} constant(8)
  %w = (u32[], bf16[256,8]) parameter(0)
  %i = u32[] get-tuple-element(%w), index=0
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%layer_body (l: (s32[], bf16[256,8])) -> (s32[], bf16[256,8]) {
  %l = (s32[], bf16[256,8]) parameter(0)
  %loop = (u32[], bf16[256,8]) while(%init), condition=%windowed_cond, body=%windowed_body
  ROOT %o = (s32[], bf16[256,8]) tuple(%k, %y)
}

%layer_cond (l: (s32[], bf16[256,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: bf16[256,8]) -> bf16[256,8] {
  %scan = (s32[], bf16[256,8]) while(%init0), condition=%layer_cond, body=%layer_body, backend_config={"known_trip_count":{"n":"2"}}
  ROOT %z = bf16[256,8]{1,0} copy(%a)
}
"""


def test_parser_counts_a_collective_stepped_over_a_loop_once_per_loop():
  found = comm.comm_bytes(STEPPED_HLO)
  assert found["ops"]["all-gather"] == 2  # Once per layer, not 2 x 8.
  assert found["bytes"]["all-gather"] == 2 * 4096 * 8 * 2
  assert found["ops"]["collective-permute"] == 2 * 8  # Every iteration of every layer.

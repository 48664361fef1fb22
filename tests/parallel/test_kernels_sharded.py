"""Every Pallas kernel inside a sharded program: flash attention (forward + backward), the low-bit
matmuls, the MoE grouped matmul and paged decode run per device in a `shard_map` over every mesh
axis, placed by the rule presets.

Two checks: on 4 simulated CPU devices the TPU kernels in interpret mode give what the same
kernels give unsharded (forward and gradients; fsdp_tp covers the rows split over fsdp, weights
gathered over it and split over tensor, row-parallel partial sums; dp the batch split alone); and
for every preset (dp, fsdp, tp, fsdp_tp, and tp with sequence parallelism) libtpu compiles one
program holding all of them for a v5e:2x2 slice (before the per-device calls over every mesh axis,
Mosaic refused with "cannot be automatically partitioned").
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import reslm.models.attention.flash  # noqa: F401  (registers the mixer)
from reslm.compress.quantize import matmul as qmm
from reslm.kernels_pallas.quant_matmul import packing
from reslm.kernels_pallas.ragged_matmul import ragged_matmul
from reslm.models import ModelConfig
from reslm.models import moe as moe_lib
from reslm.models.attention.paged import paged_decode
from reslm.models.registry import MIXERS
from reslm.models.sharding import logical_to_spec
from reslm.parallel import mesh as mesh_lib
from reslm.parallel import rules as rules_lib
from reslm.training import aot as train_aot
from tests.parallel.common import MODEL, batch, parallel_config, train_config

# preset -> (mesh sizes over 4 devices, sequence parallel)
LAYOUTS = {
  "dp": (dict(data=4), False),
  "fsdp": (dict(fsdp=4), False),
  "tp": (dict(tensor=4), False),
  "fsdp_tp": (dict(fsdp=2, tensor=2), False),
  "tp_sp": (dict(tensor=4), True),
}
B, T, HEADS, KV_HEADS, HEAD_DIM = 4, 128, 8, 4, 64
M, K, N, GROUP = 64, 256, 512, 32  # Quantized matmul: tokens x in x out; int4 group size.


def mesh_and_rules(layout: str, devices):
  sizes, sp = LAYOUTS[layout]
  preset = layout.removesuffix("_sp")
  mesh = mesh_lib.make_mesh(parallel_config(preset, **sizes), devices)
  return mesh, rules_lib.get_rules(preset, sequence_parallel=sp)


def placed(mesh, rules, tree, axes):
  """NamedShardings for `tree` from logical `axes` (a matching tree of name tuples)."""
  is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)
  return jax.tree.map(
    lambda names, a: NamedSharding(
      mesh, logical_to_spec(names, rules, np.shape(a), dict(mesh.shape))
    ),
    axes,
    tree,
    is_leaf=is_names,
  )


# The programs ---------------------------------------------------------------------------------


def flash_program(interpret: bool):
  options = dict(implementation="pallas", interpret=interpret, block_q=64, block_k=128)
  cfg = ModelConfig(
    vocab_size=8, d_model=HEADS * HEAD_DIM, num_layers=1, num_heads=HEADS, num_kv_heads=KV_HEADS,
    mixer="flash", mixer_options=options,
  )  # fmt: skip
  layer = MIXERS.build("flash", cfg, causal=True, rngs=nnx.Rngs(0))

  def run(q, k, v, ct):
    out, vjp = jax.vjp(lambda *a: layer.mix(*a)[0], q, k, v)
    return out, vjp(ct)

  rng = np.random.RandomState(0)
  q = rng.randn(B, T, HEADS, HEAD_DIM).astype(np.float32)
  kv = rng.randn(2, B, T, KV_HEADS, HEAD_DIM).astype(np.float32)
  args = (q, kv[0], kv[1], rng.randn(*q.shape).astype(np.float32))
  qa, ka = ("batch", "seq", "heads", "head_dim"), ("batch", "seq", "kv_heads", "head_dim")
  return run, args, (qa, ka, ka, qa)


def quant_program(interpret: bool, in_axis: str, out_axis: str):
  """int8 and int4 (forward + dx) and W8A8 forward of one [K, N] weight."""
  kernel = dict(implementation="tpu", interpret=interpret)
  axes = dict(in_axis=in_axis, out_axis=out_axis)

  def run(x, ct, w8, s8, w4, s4, ws):
    def weight_only(x):
      y8 = qmm.int8_matmul(x, w8, s8, **axes, **kernel)
      return y8, qmm.int4_matmul(x, w4, s4, group_size=GROUP, **axes, **kernel)

    (y8, y4), vjp = jax.vjp(weight_only, x)
    x_q, x_scale = packing.quantize_rows_int8(x)
    y88 = qmm.int8_int8_matmul(x_q, w8, x_scale, ws, **axes, **kernel)
    return y8, y4, y88, vjp((ct[0], ct[1]))

  rng = np.random.RandomState(1)
  x = rng.randn(M, K).astype(np.float32)
  ct = rng.randn(2, M, N).astype(np.float32)
  w8 = rng.randint(-127, 128, (K, N)).astype(np.int8)
  w4 = rng.randint(-128, 128, (K // 2, N)).astype(np.int8)
  s8 = rng.rand(N).astype(np.float32) / 50
  s4 = rng.rand(K // GROUP, N).astype(np.float32) / 10
  io = ("batch", in_axis)
  axes_ = (io, (None, None, None), (in_axis, out_axis), (out_axis,), (in_axis, out_axis),
           (None, out_axis), (out_axis,))  # fmt: skip
  return run, (x, ct, w8, s8, w4, s4, s8), axes_


def moe_program():
  """A dropless MoE layer (grouped-matmul kernel), forward and gradients of its parameters."""
  layer = moe_lib.MoE(
    HEADS * HEAD_DIM // 4, 256, 4, top_k=2, dispatch="dropless", causal=True,
    grouped_matmul="pallas", rngs=nnx.Rngs(2),
  )  # fmt: skip
  graphdef, state = nnx.split(layer)
  params = state.to_pure_dict()
  logical = rules_lib.logical_axes(state)
  names = jax.tree_util.tree_map_with_path(
    lambda path, _: logical[tuple(getattr(k, "key", k) for k in path)], params
  )

  def run(params, x, ct):
    def f(params, x):
      return nnx.merge(graphdef, params)(x)[0]

    y, vjp = jax.vjp(f, params, x)
    return y, vjp(ct)

  rng = np.random.RandomState(3)
  x = rng.randn(B, 16, layer.router.in_features).astype(np.float32)
  xa = ("batch", "seq", "embed")
  return run, (params, x, rng.randn(*x.shape).astype(np.float32)), (names, xa, xa)


def paged_program(interpret: bool):
  pages, page_size, per_seq = 16, 16, 4
  rng = np.random.RandomState(4)
  q = rng.randn(B, HEADS, HEAD_DIM).astype(np.float32)
  pool = rng.randn(2, KV_HEADS, pages, page_size, HEAD_DIM).astype(np.float32)
  lengths = np.array([5, 64, 33, 0], np.int32)
  tables = rng.permutation(pages)[: B * per_seq].reshape(B, per_seq).astype(np.int32)

  def run(q, k, v, lengths, tables):
    return paged_decode(q, k, v, lengths, tables, implementation="tpu", interpret=interpret)

  pa = ("kv_heads", None, None, None)
  axes = (("batch", "heads", None), pa, pa, ("batch",), ("batch", None))
  return run, (q, pool[0], pool[1], lengths, tables), axes


# Numerics on CPU: sharded == unsharded --------------------------------------------------------


def sharded_equals_unsharded(layout, program, args, axes, tol):
  mesh, rules = mesh_and_rules(layout, jax.devices()[:4])
  want = jax.jit(program)(*args)
  shardings = placed(mesh, rules, args, axes)
  got = jax.jit(rules_lib.with_rules(program, mesh, rules))(*jax.device_put(args, shardings))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()), rtol=0)


@pytest.mark.parametrize("layout", ["dp", "fsdp_tp"])
def test_flash_kernels_sharded_equal_unsharded(layout):
  run, args, axes = flash_program(interpret=True)
  sharded_equals_unsharded(layout, run, args, axes, 1e-5)


@pytest.mark.parametrize("layout", ["fsdp_tp"])
@pytest.mark.parametrize("in_axis, out_axis", [("embed", "mlp"), ("mlp", "embed")])
def test_quant_matmuls_sharded_equal_unsharded(layout, in_axis, out_axis):
  """Column-parallel (N split over tensor) and row-parallel (K split, partial products summed)
  weights; under FSDP the weight is gathered and the rows split."""
  run, args, axes = quant_program(True, in_axis, out_axis)
  sharded_equals_unsharded(layout, run, args, axes, 1e-5)


@pytest.mark.parametrize("layout", ["fsdp_tp"])
def test_moe_grouped_kernel_sharded_equals_unsharded(layout, monkeypatch):
  """Each device sorts and runs its own tokens through the interpreted TPU grouped-matmul kernel;
  expert hidden units split over tensor are summed once after the down projection."""

  def kernel(x, w, sizes, implementation):
    del implementation
    return ragged_matmul(x, w, sizes, implementation="tpu", interpret=True).astype(x.dtype)

  monkeypatch.setattr(moe_lib, "grouped_matmul", kernel)
  run, args, axes = moe_program()
  sharded_equals_unsharded(layout, run, args, axes, 1e-5)


@pytest.mark.parametrize("layout", ["dp", "fsdp_tp"])
def test_paged_decode_sharded_equals_unsharded(layout):
  run, args, axes = paged_program(interpret=True)
  sharded_equals_unsharded(layout, run, args, axes, 1e-5)


# libtpu compiles for a v5e:2x2 slice ----------------------------------------------------------


def tpu_devices():
  pytest.importorskip("libtpu", reason="needs the libtpu wheel (jax[tpu])")
  from reslm.parallel import aot  # noqa: PLC0415

  return aot.tpu_devices("v5e:2x2")[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_kernel_compiles_in_one_sharded_tpu_program(layout):
  """Flash forward + backward, int8/int4 forward + dx, W8A8, the MoE grouped matmul forward +
  backward and paged decode, all in one program partitioned by the preset: libtpu compiles it and
  every kernel is a Mosaic call of its own (none fell back to XLA code)."""
  mesh, rules = mesh_and_rules(layout, tpu_devices())
  programs = [
    flash_program(False),
    quant_program(False, "embed", "mlp"),
    quant_program(False, "mlp", "embed"),
    moe_program(),
    paged_program(False),
  ]

  def everything(*args_per_program):
    return [run(*args) for (run, _, _), args in zip(programs, args_per_program, strict=True)]

  abstract = [
    jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype, sharding=s),
      args,
      placed(mesh, rules, args, axes),
    )
    for _, args, axes in programs
  ]
  traced = jax.jit(rules_lib.with_rules(everything, mesh, rules)).trace(*abstract)
  text = traced.lower().compile().as_text()
  # flash 3, quant 2 x (int8, int8 dx, int4, int4 dx, w8a8), grouped 3 x (fwd, bwd lhs, bwd rhs),
  # paged 1.
  calls = text.count('custom_call_target="tpu_custom_call"')
  assert calls == 3 + 2 * 5 + 3 * 3 + 1, calls


def pipeline_step(layout: str, implementation: str, devices):
  """The flash model's train step under a pipeline preset, traced for `devices`."""
  opts = {"implementation": implementation, "block_q": 64, "block_k": 128}
  model = dataclasses.replace(
    MODEL, mixer="flash", mixer_options=opts, num_heads=2, num_kv_heads=2, d_model=256,
    max_seq_len=128,
  )  # fmt: skip
  sizes = {"dp_pp": dict(data=2, pipeline=2), "fsdp_pp": dict(fsdp=2, pipeline=2)}[layout]
  pcfg = parallel_config(layout, **sizes)
  mesh = mesh_lib.make_mesh(pcfg, devices)
  example = {k: np.tile(v, (1, 16))[:, :128] for k, v in batch(0, model).items()}
  return model, pcfg, mesh, example


def test_flash_kernels_in_pipeline_stages():
  """dp_pp: inside a stage every axis is manual (the pipeline makes its size-1 axes manual too),
  so the kernels run forward and backward (3 Mosaic calls). fsdp_pp leaves fsdp automatic inside
  a stage: the kernel call would be a shard_map nested in the stage's, whose gradient jax 0.12
  cannot lower, so 'pallas' is a one-line error and 'auto' runs the XLA code."""
  devices = tpu_devices()
  compile_step = lambda *a: train_aot.compile_step(a[0], train_config(), *a[1:])
  text = compile_step(*pipeline_step("dp_pp", "pallas", devices)).as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 3
  with pytest.raises(ValueError, match="cannot be differentiated") as err:
    compile_step(*pipeline_step("fsdp_pp", "pallas", devices))
  assert "\n" not in str(err.value)
  text = compile_step(*pipeline_step("fsdp_pp", "auto", devices)).as_text()
  assert "tpu_custom_call" not in text


def test_llama2_smoke_step_with_the_flash_kernel_compiles_under_fsdp():
  """The 7B planning config's recipe (Pallas flash, full remat, bf16 compute, scanned layers) at
  toy size: its FSDP train step compiles for a v5e:2x2 slice with the kernels in it."""
  tpu_devices()
  from experiments.configs import llama2_7b  # noqa: PLC0415

  cfg = llama2_7b.get_config("smoke")
  plan = train_aot.compile_only(cfg, "v5e:2x2", estimate=False)
  assert plan["mesh"] == {"fsdp": 4} and plan["memory_per_device"]["fits"]

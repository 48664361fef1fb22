"""Rungs 3 and 4: lowering for TPU and CUDA from a CPU host, rematerialisation, and a real Mosaic
compile for a TPU topology through libtpu.

`jax.export` runs the Pallas -> Mosaic TPU / Mosaic GPU lowering (block-shape rules, wgmma operand
rules, unsupported primitives, device queries at trace time) without any accelerator; the libtpu
compile additionally runs Mosaic's own passes and the VMEM allocator.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reslm.kernels_pallas.flash_attention import RESIDUAL_NAMES, BlockSizes, flash_attention
from tests.kernels_pallas.flash_attention.harness import export_text, has_libtpu

TPU_CALL, GPU_CALL = "tpu_custom_call", "mosaic_gpu_v2"


def shapes(dtype, *, batch=1, q_len=1024, kv_len=1024, heads=8, kv_heads=2, head_dim=128):
  """Production-like abstract inputs (export is cheap, so real sizes are used)."""
  q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype)
  seg = (
    jax.ShapeDtypeStruct((batch, q_len), jnp.int32),
    jax.ShapeDtypeStruct((batch, kv_len), jnp.int32),
  )
  return q, kv, seg


def forward_and_grad(implementation, *, causal=True, blocks=None):
  """(forward fn, grad fn) of flash attention with segment ids as an argument."""

  def forward(q, k, v, segs):
    return flash_attention(
      q, k, v, segment_ids=segs, causal=causal, block_sizes=blocks, implementation=implementation
    )

  def loss(q, k, v, segs):
    return forward(q, k, v, segs).astype(jnp.float32).sum()

  return forward, jax.grad(loss, argnums=(0, 1, 2))


def kernel_names(text: str) -> list[str]:
  return re.findall(r'kernel_name = "(\w+)"', text)


@pytest.mark.parametrize("implementation", ["tpu", "auto"])
@pytest.mark.parametrize(
  ("dtype", "causal", "q_len"), [(jnp.bfloat16, True, 1000), (jnp.float32, False, 1024)]
)
def test_exports_for_tpu(implementation, dtype, causal, q_len):
  """Forward and gradient lower to the three Mosaic kernels (with their cost estimates)."""
  q, kv, seg = shapes(dtype, q_len=q_len, kv_len=q_len)
  forward, grad = forward_and_grad(implementation, causal=causal)
  fwd_text = export_text(forward, (q, kv, kv, seg), "tpu")
  assert kernel_names(fwd_text) == ["flash_attention_fwd"]
  grad_text = export_text(grad, (q, kv, kv, seg), "tpu")
  assert sorted(kernel_names(grad_text)) == sorted(
    ["flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"]
  )
  assert grad_text.count(TPU_CALL) == 3 and GPU_CALL not in grad_text
  flops = [int(f) for f in re.findall(r"flops\\22:(\d+)", grad_text)]
  assert len(flops) == 3 and min(flops) > 0


@pytest.mark.parametrize("implementation", ["gpu", "auto"])
def test_exports_for_cuda(implementation):
  """Forward and gradient lower to the three Mosaic GPU kernels for an (abstract) H100."""
  q, kv, seg = shapes(jnp.bfloat16, q_len=1000, kv_len=1000, head_dim=96)
  forward, grad = forward_and_grad(implementation)
  assert export_text(forward, (q, kv, kv, seg), "cuda").count(GPU_CALL) == 1
  grad_text = export_text(grad, (q, kv, kv, seg), "cuda")
  assert grad_text.count(GPU_CALL) == 3 and TPU_CALL not in grad_text


def test_auto_lowers_to_the_reference_elsewhere():
  """On CPU (and for float32 on CUDA, which the GPU kernel does not take) "auto" has no kernel."""
  q, kv, seg = shapes(jnp.float32, q_len=256, kv_len=256)
  _, grad = forward_and_grad("auto")
  assert "custom_call" not in export_text(grad, (q, kv, kv, seg), "cpu")
  assert GPU_CALL not in export_text(grad, (q, kv, kv, seg), "cuda")


@pytest.mark.parametrize(
  ("policy", "expected"),
  [
    (None, ["fwd", "dq", "dkv"]),  # No remat.
    (jax.checkpoint_policies.nothing_saveable, ["fwd", "fwd", "dq", "dkv"]),
    (jax.checkpoint_policies.save_only_these_names(*RESIDUAL_NAMES), ["fwd", "dq", "dkv"]),
  ],
  ids=["plain", "remat_all", "remat_save_residuals"],
)
def test_remat_recomputes_the_forward_kernel_only_when_asked(policy, expected):
  """With the loss value also needed, jax.checkpoint makes the backward pass rerun the forward
  kernel once, unless the policy saves the named residuals (out, lse); the backward kernels run
  once either way."""
  q, kv, seg = shapes(jnp.bfloat16, q_len=512, kv_len=512)

  def layer(q, k, v, segs):
    out = flash_attention(q, k, v, segment_ids=segs, implementation="tpu")
    return jnp.tanh(out.astype(jnp.float32)).sum()

  if policy is not None:
    layer = jax.checkpoint(layer, policy=policy)
  traced = jax.jit(jax.value_and_grad(layer, argnums=(0, 1, 2))).trace(q, kv, kv, seg)
  text = traced.lower(lowering_platforms=("tpu",)).as_text()
  names = sorted(n.removeprefix("flash_attention_") for n in kernel_names(text))
  assert names == sorted(expected)


@pytest.mark.skipif(not has_libtpu(), reason="needs the libtpu wheel (jax[tpu])")
def test_compiles_for_a_tpu_v5e_topology():
  """libtpu compiles forward + backward (Mosaic passes, VMEM allocation) for a v5e chip."""
  from jax.experimental import topologies  # noqa: PLC0415

  device = topologies.get_topology_desc("v5e:2x2", platform="tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)

  def on_device(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  q, kv, seg = jax.tree.map(on_device, shapes(jnp.bfloat16, q_len=1000, kv_len=1000, head_dim=64))
  _, grad = forward_and_grad("tpu", blocks=BlockSizes(block_q=256, block_kv=256))

  def step(q, k, v, segs):
    return grad(q, k, v, segs)

  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("x",))):
    compiled = jax.jit(step).trace(q, kv, kv, seg).lower().compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  assert cost["flops"] > 0
  assert "tpu_custom_call" in compiled.as_text()

"""Rungs 3 and 4: lowering for TPU and CUDA from a CPU host at an MoE-layer shape, and a real Mosaic
compile for TPU v5e and v6e chips through libtpu."""

import re

import jax
import jax.numpy as jnp
import pytest

from reslm.kernels_pallas.ragged_matmul import ragged_matmul
from tests.kernels_pallas.ragged_matmul.harness import (
  TRITON_CALL,
  compile_for_tpu,
  export_text,
  has_libtpu,
)

TPU_CALL = "tpu_custom_call"
KERNELS = ["ragged_matmul", "ragged_matmul_dlhs", "ragged_matmul_drhs"]


def _shapes(m=4096, k=2048, n=1024, groups=16, dtype=jnp.bfloat16):
  """Tokens x experts of one MoE up-projection (production-like; export is cheap)."""
  sd = jax.ShapeDtypeStruct
  return sd((m, k), dtype), sd((groups, k, n), dtype), sd((groups,), jnp.int32)


def _value_and_grad(implementation):
  def loss(lhs, rhs, sizes):
    return ragged_matmul(lhs, rhs, sizes, implementation=implementation).astype(jnp.float32).sum()

  return jax.value_and_grad(loss, argnums=(0, 1))


def _names(text):
  return sorted(re.findall(r'(?:kernel_name|name) = "(ragged_matmul\w*)"', text))


@pytest.mark.parametrize("implementation", ["tpu", "auto"])
def test_forward_and_grads_export_for_tpu(implementation):
  text = export_text(_value_and_grad(implementation), _shapes(), "tpu")
  assert _names(text) == KERNELS
  assert text.count(TPU_CALL) == 3 and TRITON_CALL not in text


def test_forward_and_grads_export_for_cuda():
  text = export_text(_value_and_grad("auto"), _shapes(dtype=jnp.float32), "cuda")
  assert _names(text) == KERNELS
  assert text.count(TRITON_CALL) == 3 and TPU_CALL not in text


def test_auto_lowers_to_ragged_dot_on_cpu():
  text = export_text(_value_and_grad("auto"), _shapes(256, 128, 128, 4), "cpu")
  assert "custom_call" not in text and "ragged_dot" in text


@pytest.mark.skipif(not has_libtpu(), reason="needs the libtpu wheel (jax[tpu])")
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_compiles_for_tpu(topology):
  """libtpu compiles the three kernels (Mosaic passes, VMEM allocation, SMEM visit list)."""
  compiled = compile_for_tpu(_value_and_grad("tpu"), _shapes(2048, 1024, 512, 8), topology)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  assert cost["flops"] >= 3 * 2 * 2048 * 1024 * 512
  assert compiled.as_text().count(TPU_CALL) == 3

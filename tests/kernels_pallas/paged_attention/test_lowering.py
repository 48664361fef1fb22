"""Rungs 3 and 4: lowering for TPU and CUDA from a CPU host at a serving shape (32 sequences,
32 query / 8 kv heads, head_dim 128, 2048-token block tables), and a real Mosaic compile for TPU
v5e and v6e chips through libtpu."""

import re

import jax
import jax.numpy as jnp
import pytest

from reslm.kernels_pallas.paged_attention import paged_attention
from tests.kernels_pallas.paged_attention.harness import (
  TRITON_CALL,
  compile_for_tpu,
  export_text,
  has_libtpu,
)

TPU_CALL = "tpu_custom_call"


def _shapes(kv_dtype, head_dim=128, page_size=32):
  sd = jax.ShapeDtypeStruct
  pool = (8, 2048, page_size, head_dim)
  args = (
    sd((32, 32, head_dim), jnp.bfloat16), sd(pool, kv_dtype), sd(pool, kv_dtype),
    sd((32,), jnp.int32), sd((32, 64), jnp.int32),
  )  # fmt: skip
  if kv_dtype == jnp.int8:
    args += (sd(pool[:3], jnp.float32),) * 2
  return args


def _fn(implementation):
  def attend(q, k, v, lengths, tables, k_scale=None, v_scale=None):
    return paged_attention(
      q, k, v, lengths, tables, k_scale=k_scale, v_scale=v_scale, implementation=implementation
    )

  return attend


@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.int8])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_exports(platform, kv_dtype):
  text = export_text(_fn("auto"), _shapes(kv_dtype), platform)
  assert re.findall(r'(?:kernel_name|name) = "(paged_attention)"', text) == ["paged_attention"]
  call, other = (TPU_CALL, TRITON_CALL) if platform == "tpu" else (TRITON_CALL, TPU_CALL)
  assert text.count(call) == 1 and other not in text


def test_auto_falls_back_where_a_kernel_cannot_run():
  """head_dim 96 is not a power of two, 16-token int8 pages are not whole int8 tiles: "auto"
  lowers the reference for that platform, the explicit backend refuses."""
  args = _shapes(jnp.bfloat16, head_dim=96)
  assert "custom_call" not in export_text(_fn("auto"), args, "cuda")
  assert "tpu_custom_call" in export_text(_fn("auto"), args, "tpu")
  with pytest.raises(ValueError, match="head_dim=96"):
    export_text(_fn("gpu"), args, "cuda")
  args = _shapes(jnp.int8, page_size=16)
  assert "custom_call" not in export_text(_fn("auto"), args, "tpu")
  assert TRITON_CALL in export_text(_fn("auto"), args, "cuda")
  with pytest.raises(ValueError, match="page_size=16"):
    export_text(_fn("tpu"), args, "tpu")


@pytest.mark.skipif(not has_libtpu(), reason="needs the libtpu wheel (jax[tpu])")
@pytest.mark.parametrize(
  ("topology", "kv_dtype"), [("v5e:2x2", jnp.int8), ("v6e:2x2", jnp.bfloat16)]
)
def test_compiles_for_tpu(topology, kv_dtype):
  """libtpu compiles the kernel: page DMAs from HBM, semaphores, SMEM block table, VMEM buffers."""
  compiled = compile_for_tpu(_fn("tpu"), _shapes(kv_dtype), topology)
  assert TPU_CALL in compiled.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  assert cost["flops"] >= 4 * 32 * 32 * 64 * 32 * 128

"""Rungs 3 and 4: lowering for TPU and CUDA from a CPU host at production shapes, and a real
Mosaic compile for TPU v5e and v6e chips through libtpu."""

import re

import jax
import jax.numpy as jnp
import pytest

from reslm.kernels_pallas.quant_matmul import int4_matmul, int8_int8_matmul, int8_matmul
from tests.kernels_pallas.quant_matmul.harness import (
  TRITON_CALL,
  compile_for_tpu,
  export_text,
  has_libtpu,
)

TPU_CALL = "tpu_custom_call"
M, K, N = 256, 4096, 4096  # A 7B-class projection on a 256-token chunk.


def _shapes(kind, m=M, k=K, n=N):
  sd = jax.ShapeDtypeStruct
  if kind == "int8":
    return sd((m, k), jnp.bfloat16), sd((k, n), jnp.int8), sd((n,), jnp.float32)
  if kind == "int4":
    return sd((m, k), jnp.bfloat16), sd((k // 2, n), jnp.int8), sd((k // 128, n), jnp.float32)
  return sd((m, k), jnp.int8), sd((k, n), jnp.int8), sd((m,), jnp.float32), sd((n,), jnp.float32)


def _forward(kind, implementation):
  if kind == "int8":
    return lambda x, w, s: int8_matmul(x, w, s, implementation=implementation)
  if kind == "int4":
    return lambda x, w, s: int4_matmul(x, w, s, group_size=128, implementation=implementation)
  return lambda x, w, xs, ws: int8_int8_matmul(x, w, xs, ws, implementation=implementation)


def _value_and_grad(kind, implementation):
  fwd = _forward(kind, implementation)
  return jax.value_and_grad(lambda x, *rest: fwd(x, *rest).astype(jnp.float32).sum())


def _names(text):
  return re.findall(r'(?:kernel_name|name) = "(quant_matmul\w*)"', text)


@pytest.mark.parametrize("implementation", ["tpu", "auto"])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_forward_and_grad_export_for_tpu(kind, implementation):
  text = export_text(_value_and_grad(kind, implementation), _shapes(kind), "tpu")
  assert sorted(_names(text)) == [f"quant_matmul_{kind}", f"quant_matmul_{kind}_dx"]
  assert text.count(TPU_CALL) == 2 and TRITON_CALL not in text
  assert len(re.findall(r"flops\\22:(\d+)", text)) == 2


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_forward_and_grad_export_for_cuda(kind):
  text = export_text(_value_and_grad(kind, "auto"), _shapes(kind), "cuda")
  assert sorted(_names(text)) == [f"quant_matmul_{kind}", f"quant_matmul_{kind}_dx"]
  assert text.count(TRITON_CALL) == 2 and TPU_CALL not in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_w8a8_exports(platform):
  text = export_text(_forward("int8_int8", "auto"), _shapes("int8_int8"), platform)
  assert _names(text) == ["quant_matmul_int8_int8"]
  assert (TPU_CALL if platform == "tpu" else TRITON_CALL) in text


def test_auto_lowers_to_the_reference_on_cpu():
  text = export_text(_value_and_grad("int4", "auto"), _shapes("int4", m=8, k=256, n=128), "cpu")
  assert "custom_call" not in text


@pytest.mark.skipif(not has_libtpu(), reason="needs the libtpu wheel (jax[tpu])")
@pytest.mark.parametrize(
  ("topology", "kind", "m"),
  [
    ("v5e:2x2", "int4", M),
    ("v5e:2x2", "int8", 8),  # Decode: one full-dim row tile.
    ("v5e:2x2", "int8_int8", M),
    ("v6e:2x2", "int4", 8),
  ],
)
def test_compiles_for_tpu(topology, kind, m):
  """libtpu compiles forward (+ dx) with Mosaic's passes and VMEM allocation; XLA's cost model
  sees the kernels' cost estimates."""
  fn = _forward(kind, "tpu") if kind == "int8_int8" else _value_and_grad(kind, "tpu")
  compiled = compile_for_tpu(fn, _shapes(kind, m=m), topology)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  assert cost["flops"] >= 2 * m * K * N
  assert TPU_CALL in compiled.as_text()

"""Compiles the low-bit matmul kernels for Cloud TPU topologies on a CPU-only host (libtpu).

Runs the real Mosaic compiler and VMEM allocator on production shapes and prints XLA's static
cost model (`optimal_seconds` from the kernels' `pl.CostEstimate`, not a measurement) and the
per-device memory. Each `ConcatBitcast` custom call in the optimised HLO adds exactly -1 s
("unknown") to `optimal_seconds`; they are added back. The tests compile a few cases; this script
covers every kernel and generation. Expected failure: W8A8 on v4 (no int8 MXU).

  JAX_PLATFORMS=cpu python3 -m kernels_pallas.quant_matmul.compile_check [v5e:2x2 v6e:2x2 ...]
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from reslm.kernels_pallas.quant_matmul import int4_matmul, int8_int8_matmul, int8_matmul
from reslm.parallel import aot

TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2", "tpu7x:2x2x1")
K, N = 4096, 4096


def _grad(fwd):
  return jax.value_and_grad(lambda a, *rest: fwd(a, *rest).astype(jnp.float32).sum())


def _cases():
  """(name, fn, shapes): forward + dx of int8 / int4 (bf16 x), and W8A8, at decode and prefill M."""
  sd = jax.ShapeDtypeStruct
  for m in (16, 2048):
    x = sd((m, K), jnp.bfloat16)

    yield (
      f"int8 fwd+dx M={m}",
      _grad(lambda x, w, s: int8_matmul(x, w, s, implementation="tpu")),
      (x, sd((K, N), jnp.int8), sd((N,), jnp.float32)),
    )
    yield (
      f"int4 g128 fwd+dx M={m}",
      _grad(lambda x, w, s: int4_matmul(x, w, s, group_size=128, implementation="tpu")),
      (x, sd((K // 2, N), jnp.int8), sd((K // 128, N), jnp.float32)),
    )
    yield (
      f"int4 g32 fwd M={m}",
      lambda x, w, s: int4_matmul(x, w, s, group_size=32, implementation="tpu"),
      (x, sd((K // 2, N), jnp.int8), sd((K // 32, N), jnp.float32)),
    )
    yield (
      f"w8a8 fwd M={m}",
      lambda x, w, xs, ws: int8_int8_matmul(x, w, xs, ws, implementation="tpu"),
      (sd((m, K), jnp.int8), sd((K, N), jnp.int8), sd((m,), jnp.float32), sd((N,), jnp.float32)),
    )


def compile_on(device, fn, shapes):
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in shapes]
  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("x",))):
    return jax.jit(fn).trace(*args).lower().compile()


def main(names, cases=_cases):
  from jax.experimental import topologies  # noqa: PLC0415

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Compiling needs no chip lock.
  for name in names or TOPOLOGIES:
    device = topologies.get_topology_desc(name, platform="tpu").devices[0]
    for label, fn, shapes in cases():
      start = time.time()
      try:
        compiled = compile_on(device, fn, shapes)
      except Exception as err:  # Report and go on: one failure should not hide the others.
        print(
          f"{name:12s} {label:28s} FAILED {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        )
        continue
      cost = aot.cost(compiled)  # optimal_seconds corrected for libtpu's ConcatBitcast "unknown"
      optimal = cost["optimal_seconds"] or 0.0
      mem = compiled.memory_analysis()
      print(
        f"{name:12s} {label:28s} compile {time.time() - start:5.1f}s  flops {cost['flops'] or 0:.3e}"
        f"  optimal {optimal * 1e6:9.1f} us"
        f"  args+temp {(mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20:7.1f} MiB",
        flush=True,
      )


if __name__ == "__main__":
  main(sys.argv[1:])

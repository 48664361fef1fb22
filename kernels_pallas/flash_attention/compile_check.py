"""Compiles flash-attention forward + backward for Cloud TPU topologies on a CPU-only host (libtpu).

Runs the real Mosaic compiler and VMEM allocator, then prints XLA's static cost model (flops,
`optimal_seconds`, a roofline estimate from the kernels' `pl.CostEstimate`, not a measurement) and
the per-device memory. Each `ConcatBitcast` custom call in the optimised HLO adds exactly -1.0 s
("unknown") to `optimal_seconds`; the script adds those back. The test suite compiles one small case for v5e; this script covers the
generations and production shapes, which take longer.

  JAX_PLATFORMS=cpu python3 -m kernels_pallas.flash_attention.compile_check [v5e:2x2 v6e:2x2 ...]
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from reslm.kernels_pallas.flash_attention.api import flash_attention
from reslm.parallel import aot

TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2", "tpu7x:2x2x1")
# (batch, seq, heads, kv_heads, head_dim, dtype, causal, segments)
SHAPES = (
  (1, 4096, 32, 8, 128, jnp.bfloat16, True, False),  # Llama-style GQA prefill / training.
  (2, 2048, 16, 16, 64, jnp.bfloat16, True, True),  # Packed sequences.
  (1, 1000, 8, 1, 128, jnp.float32, False, False),  # float32, MQA, ragged length.
)


def _describe(batch, seq, heads, kv_heads, head_dim, dtype, causal, segments):
  mask = ("causal" if causal else "bidir") + ("+seg" if segments else "")
  return f"{batch}x{seq} h{heads}/{kv_heads} d{head_dim} {jnp.dtype(dtype).name} {mask}"


def compile_one(device, batch, seq, heads, kv_heads, head_dim, dtype, causal, segments):
  sharding = jax.sharding.SingleDeviceSharding(device)
  q = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), dtype, sharding=sharding)
  kv = jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), dtype, sharding=sharding)
  seg = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding) if segments else None

  def loss(q, k, v, seg):
    out = flash_attention(q, k, v, segment_ids=seg, causal=causal, implementation="tpu")
    return out.astype(jnp.float32).sum()

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("x",))):
    return step.trace(q, kv, kv, seg).lower().compile()


def main(names):
  for name in names or TOPOLOGIES:
    device = topologies.get_topology_desc(name, platform="tpu").devices[0]
    for shape in SHAPES:
      start = time.time()
      try:
        compiled = compile_one(device, *shape)
      except Exception as err:  # Report and go on: one failing generation should not hide others.
        print(f"{name:12s} {shape}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        continue
      cost = aot.cost(compiled)  # optimal_seconds corrected for libtpu's ConcatBitcast "unknown"
      optimal = cost["optimal_seconds"] or 0.0
      memory = compiled.memory_analysis()
      print(
        f"{name:12s} {device.device_kind:12s} {_describe(*shape):34s} compile {time.time() - start:5.1f}s"
        f"  flops {cost['flops'] or 0:.3e}  optimal {optimal * 1e3:.3f} ms"
        f"  args+temp {(memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**20:.1f} MiB"
      )


if __name__ == "__main__":
  main(sys.argv[1:])

"""Compiles every Pallas kernel for Cloud TPU topologies on a CPU-only host (libtpu).

Runs the real Mosaic compiler and VMEM allocator on production shapes and prints, per topology
and case, XLA's static cost model (flops and `optimal_seconds`, a roofline estimate from the
kernels' `pl.CostEstimate`, not a measurement; see research/tpu_aot.md) and the per-device
memory. Each `ConcatBitcast` custom call in the optimised HLO adds exactly -1 s ("unknown") to
`optimal_seconds`; `parallel.aot.cost` adds those back. The test suite compiles a few small cases;
this script covers every kernel and generation. Expected failure: W8A8 on v4 (no int8 MXU).

  JAX_PLATFORMS=cpu python -m experiments.compile_kernels [--ops=flash,quant,ragged,paged] \
      [--topologies=v4:2x2x1,v5e:2x2,v5p:2x2x1,v6e:2x2,tpu7x:2x2x1]
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from reslm.kernels_pallas.flash_attention import flash_attention
from reslm.kernels_pallas.paged_attention import paged_attention
from reslm.kernels_pallas.quant_matmul import int4_matmul, int8_int8_matmul, int8_matmul
from reslm.kernels_pallas.ragged_matmul import ragged_matmul
from reslm.parallel import aot

TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2", "tpu7x:2x2x1")
sd = jax.ShapeDtypeStruct


def _grad(loss, argnums=0):
  return jax.value_and_grad(lambda *a: loss(*a).astype(jnp.float32).sum(), argnums=argnums)


def flash_cases():
  """Forward + dq, dk, dv: (batch, seq, heads, kv_heads, head_dim, dtype, causal, segments)."""
  for b, t, h, hk, d, dtype, causal, segments in (
    (1, 4096, 32, 8, 128, jnp.bfloat16, True, False),  # Llama-style GQA prefill / training.
    (2, 2048, 16, 16, 64, jnp.bfloat16, True, True),  # Packed sequences.
    (1, 1000, 8, 1, 128, jnp.float32, False, False),  # float32, MQA, ragged length.
  ):
    shapes = [sd((b, t, h, d), dtype), sd((b, t, hk, d), dtype), sd((b, t, hk, d), dtype)]
    if segments:
      shapes.append(sd((b, t), jnp.int32))

    def attend(q, k, v, seg=None, causal=causal):
      return flash_attention(q, k, v, segment_ids=seg, causal=causal, implementation="tpu")

    mask = ("causal" if causal else "bidir") + ("+seg" if segments else "")
    label = f"flash fwd+bwd {b}x{t} h{h}/{hk} d{d} {jnp.dtype(dtype).name} {mask}"
    yield label, _grad(attend, argnums=(0, 1, 2)), tuple(shapes)


def quant_cases():
  """int8 / int4 (bf16 x) forward + dx, and W8A8 forward, at decode and prefill M."""
  k, n = 4096, 4096
  for m in (16, 2048):
    x = sd((m, k), jnp.bfloat16)
    yield (
      f"int8 fwd+dx M={m}",
      _grad(lambda x, w, s: int8_matmul(x, w, s, implementation="tpu")),
      (x, sd((k, n), jnp.int8), sd((n,), jnp.float32)),
    )
    yield (
      f"int4 g128 fwd+dx M={m}",
      _grad(lambda x, w, s: int4_matmul(x, w, s, group_size=128, implementation="tpu")),
      (x, sd((k // 2, n), jnp.int8), sd((k // 128, n), jnp.float32)),
    )
    yield (
      f"int4 g32 fwd M={m}",
      lambda x, w, s: int4_matmul(x, w, s, group_size=32, implementation="tpu"),
      (x, sd((k // 2, n), jnp.int8), sd((k // 32, n), jnp.float32)),
    )
    yield (
      f"w8a8 fwd M={m}",
      lambda x, w, xs, ws: int8_int8_matmul(x, w, xs, ws, implementation="tpu"),
      (sd((m, k), jnp.int8), sd((k, n), jnp.int8), sd((m,), jnp.float32), sd((n,), jnp.float32)),
    )


def ragged_cases():
  """MoE up-projections, forward + both gradients: (tokens x top_k, d_model, d_ff, experts)."""
  for m, k, n, g in ((8192, 4096, 1408, 64), (16384, 4096, 14336, 8)):
    shapes = (sd((m, k), jnp.bfloat16), sd((g, k, n), jnp.bfloat16), sd((g,), jnp.int32))
    fn = _grad(lambda lhs, rhs, sizes: ragged_matmul(lhs, rhs, sizes, implementation="tpu"), (0, 1))
    yield f"ragged fwd+grads {m}x{k}x{n} G={g}", fn, shapes


def paged_cases():
  """Decode over a paged cache: (batch, heads, kv_heads, head_dim, page, pages/seq, dtype)."""
  for b, h, hk, d, ps, pps, dtype in (
    (64, 32, 8, 128, 32, 128, jnp.bfloat16),  # Llama-style GQA, 4096-token capacity.
    (64, 32, 8, 128, 32, 128, jnp.int8),
    (16, 16, 16, 64, 16, 256, jnp.bfloat16),  # MHA, 16-token pages.
  ):
    pool = (hk, b * pps, ps, d)
    shapes = [sd((b, h, d), jnp.bfloat16), sd(pool, dtype), sd(pool, dtype)]
    shapes += [sd((b,), jnp.int32), sd((b, pps), jnp.int32)]
    if dtype == jnp.int8:
      shapes += [sd(pool[:3], jnp.float32)] * 2

    def attend(q, k, v, lengths, tables, *scales):
      k_scale, v_scale = scales or (None, None)
      return paged_attention(
        q, k, v, lengths, tables, k_scale=k_scale, v_scale=v_scale, implementation="tpu"
      )

    label = f"paged B={b} h{h}/{hk} d{d} page{ps}x{pps} {jnp.dtype(dtype).name}"
    yield label, attend, tuple(shapes)


OPS = {"flash": flash_cases, "quant": quant_cases, "ragged": ragged_cases, "paged": paged_cases}

flags.DEFINE_list("ops", list(OPS), f"Kernels to compile: {', '.join(OPS)}.")
flags.DEFINE_list("topologies", list(TOPOLOGIES), "TPU topologies (libtpu names).")
FLAGS = flags.FLAGS


def compile_on(device, fn, shapes):
  """Traces, lowers and compiles `fn` for one TPU device of a topology, from shapes only."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = [sd(s.shape, s.dtype, sharding=sharding) for s in shapes]
  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("x",))):
    return jax.jit(fn).trace(*args).lower().compile()


def main(argv):
  del argv
  from jax.experimental import topologies  # noqa: PLC0415  (loads libtpu)

  unknown = sorted(set(FLAGS.ops) - set(OPS))
  if unknown:
    raise app.UsageError(f"--ops={unknown[0]} is not known; choose from {', '.join(OPS)}")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Compiling needs no chip lock.
  for name in FLAGS.topologies:
    device = topologies.get_topology_desc(name, platform="tpu").devices[0]
    for op in FLAGS.ops:
      for label, fn, shapes in OPS[op]():
        start = time.time()
        try:
          compiled = compile_on(device, fn, shapes)
        except Exception as err:  # Report and go on: one failure should not hide the others.
          message = str(err).splitlines()[0][:160]
          print(f"{name:12s} {label:44s} FAILED {type(err).__name__}: {message}", flush=True)
          continue
        cost = aot.cost(compiled)  # optimal_seconds corrected for libtpu's ConcatBitcast "unknown"
        mem = compiled.memory_analysis()
        print(
          f"{name:12s} {label:44s} compile {time.time() - start:5.1f}s"
          f"  flops {cost['flops'] or 0:.3e}  optimal {(cost['optimal_seconds'] or 0) * 1e6:9.1f} us"
          f"  args+temp {(mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20:7.1f} MiB",
          flush=True,
        )


if __name__ == "__main__":
  app.run(main)

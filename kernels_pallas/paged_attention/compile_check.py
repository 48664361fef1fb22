"""Compiles the paged-attention decode kernel for Cloud TPU topologies on a CPU-only host
(libtpu), printing XLA's static cost estimate and memory per shape.

  JAX_PLATFORMS=cpu python3 -m kernels_pallas.paged_attention.compile_check [v5e:2x2 v6e:2x2 ...]
"""

import sys

import jax
import jax.numpy as jnp

from reslm.kernels_pallas.paged_attention import paged_attention
from reslm.kernels_pallas.quant_matmul.compile_check import main as _main


def _cases():
  """(batch, heads, kv_heads, head_dim, page_size, pages per sequence, cache dtype)."""
  sd = jax.ShapeDtypeStruct
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

    label = f"B={b} h{h}/{hk} d{d} page{ps}x{pps} {jnp.dtype(dtype).name}"
    yield label, attend, tuple(shapes)


if __name__ == "__main__":
  _main(sys.argv[1:], cases=_cases)

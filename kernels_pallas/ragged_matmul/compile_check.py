"""Compiles the grouped-matmul kernels (forward, d lhs, d rhs) for Cloud TPU topologies on a
CPU-only host (libtpu), printing XLA's static cost estimate and memory per shape.

  JAX_PLATFORMS=cpu python3 -m kernels_pallas.ragged_matmul.compile_check [v5e:2x2 v6e:2x2 ...]
"""

import sys

import jax
import jax.numpy as jnp

from reslm.kernels_pallas.quant_matmul.compile_check import main as _main
from reslm.kernels_pallas.ragged_matmul import ragged_matmul


def _cases():
  """MoE up-projections: (tokens x top_k, d_model, d_ff per expert, experts)."""
  sd = jax.ShapeDtypeStruct
  for m, k, n, g in ((8192, 4096, 1408, 64), (16384, 4096, 14336, 8)):

    def loss(lhs, rhs, sizes):
      return ragged_matmul(lhs, rhs, sizes, implementation="tpu").astype(jnp.float32).sum()

    shapes = (sd((m, k), jnp.bfloat16), sd((g, k, n), jnp.bfloat16), sd((g,), jnp.int32))
    yield f"fwd+grads {m}x{k}x{n} G={g}", jax.value_and_grad(loss, argnums=(0, 1)), shapes


if __name__ == "__main__":
  _main(sys.argv[1:], cases=_cases)

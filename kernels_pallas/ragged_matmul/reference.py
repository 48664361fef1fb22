"""Grouped (ragged) matmul by its definition: the kernel tests' oracle and the CPU fallback.

Rows of lhs are sorted by group: rows [offset_g, offset_g + size_g) belong to group g, with
offset_g = size_0 + ... + size_{g-1}, and are multiplied by rhs[g]:

  out[r] = lhs[r] @ rhs[g(r)]        (float32 products and sums)

Rows past the last group (sum(group_sizes) < M) are zero; empty groups are allowed. This is
`jax.lax.ragged_dot`; its VJP gives d lhs (rows times rhs[g]ᵀ) and d rhs[g] = lhs_gᵀ d out_g.
"""

import jax
import jax.numpy as jnp
from jax import lax


def ragged_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """lhs [M, K], rhs [G, K, N], group_sizes int [G] (sum <= M) -> [M, N] in lhs's dtype."""
  out = lax.ragged_dot(
    lhs.astype(jnp.float32),
    rhs.astype(jnp.float32),
    group_sizes.astype(jnp.int32),
    precision=lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )
  return out.astype(lhs.dtype)


def group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """(starts, ends) int32 [G]: group g owns rows [starts[g], ends[g]), clipped to [0, m]."""
  sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
  ends = jnp.minimum(jnp.cumsum(sizes), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends

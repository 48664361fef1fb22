"""Splitting the sequence axis into fixed-size chunks, for chunked scans.

Chunked linear attention, Mamba's selective scan and RWKV's WKV recurrence all process a sequence
as `n` chunks of `c` tokens: exact work inside a chunk, a state carried between chunks by
`lax.scan` over the leading chunk axis.
"""

import jax
import jax.numpy as jnp


def to_chunks(x: jax.Array, c: int) -> jax.Array:
  """[b, t, ...] -> [n, b, c, ...], zero-padding t up to a multiple of c."""
  b, t = x.shape[:2]
  x = jnp.pad(x, [(0, 0), (0, -t % c)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(b, -1, c, *x.shape[2:]), 1, 0)


def from_chunks(x: jax.Array, t: int) -> jax.Array:
  """[n, b, c, ...] -> [b, t, ...], dropping the padding."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]

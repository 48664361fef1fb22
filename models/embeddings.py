"""Token embeddings and rotary position embeddings (RoPE).

Axes: vocab, embed for the table; activations [batch, seq, embed].
"""

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.sharding import param


class Embed(nnx.Module):
  """A token embedding table that can also act as the (tied) output projection.

  Args:
    vocab_size: Number of tokens.
    dim: Embedding width.
    init_std: Standard deviation of the normal initialiser.
    dtype: Output dtype of lookups and logits.
    param_dtype: Storage dtype.
    rngs: Random streams.
  """

  def __init__(
    self,
    vocab_size: int,
    dim: int,
    *,
    init_std: float = 0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    table = init_std * jax.random.normal(rngs.params(), (vocab_size, dim), param_dtype)
    self.embedding = param(table, ("vocab", "embed"))

  def __call__(self, tokens_bt: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens_bt, axis=0).astype(self.dtype)  # [b, t, d]

  def attend(self, x_btd: jax.Array) -> jax.Array:
    """Logits x · Eᵀ in float32, [batch, seq, vocab]."""
    table = self.embedding[...].astype(self.dtype)
    b, t, d = x_btd.shape
    logits = jnp.dot(x_btd.reshape(b * t, d), table.T, preferred_element_type=jnp.float32)
    return logits.reshape(b, t, -1)


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Inverse frequencies θ^(-2i/d) for i < d/2, float32 [head_dim // 2]."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x_bthk: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (x[i], x[i + d/2]) by angle position · θ^(-2i/d) (the "half" layout).

  Args:
    x_bthk: Queries or keys, [batch, seq, heads, head_dim].
    positions_bt: Integer positions, [batch, seq].
    theta: RoPE base.

  Returns:
    The rotated array in the input dtype.
  """
  freqs = rope_frequencies(x_bthk.shape[-1], theta)
  angles = positions_bt.astype(jnp.float32)[..., None] * freqs  # [b, t, d/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_bthk.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthk.dtype)

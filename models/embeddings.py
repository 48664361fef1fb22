"""Token embeddings and rotary position embeddings (RoPE), with Llama 3.1 / linear RoPE scaling.

Axes: vocab, embed for the table; activations [batch, seq, embed].
"""

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
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
    axes: Logical names of the table (a position or token-type table: (None, "embed")).
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
    axes: Sequence[str | None] = ("vocab", "embed"),
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    table = init_std * jax.random.normal(rngs.params(), (vocab_size, dim), param_dtype)
    self.embedding = param(table, tuple(axes))

  def __call__(self, tokens_bt: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens_bt, axis=0).astype(self.dtype)  # [b, t, d]

  def attend(self, x_btd: jax.Array) -> jax.Array:
    """Logits x · Eᵀ in float32, [batch, seq, vocab]."""
    table = self.embedding[...].astype(self.dtype)
    b, t, d = x_btd.shape
    logits = jnp.dot(x_btd.reshape(b * t, d), table.T, preferred_element_type=jnp.float32)
    return logits.reshape(b, t, -1)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A rescaling of RoPE's frequencies for longer contexts (Hugging Face's `rope_scaling`).

  Attributes:
    kind: "linear" (every frequency / factor: position interpolation, Chen et al. 2023) or
      "llama3" (Llama 3.1: wavelengths above original_max_len / low_freq_factor are divided by
      `factor`, those below original_max_len / high_freq_factor kept, a smooth blend between).
    factor: The scaling factor.
    low_freq_factor, high_freq_factor, original_max_len: llama3's settings.
  """

  kind: str
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Inverse frequencies θ^(-2i/d) for i < d/2, float32 [head_dim // 2]."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def scaled_rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
  """Inverse frequencies after `scaling`, float32 [head_dim // 2], as `transformers` computes
  them (`_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`, in float32)."""
  f32 = np.float32
  inv = f32(1.0) / (f32(theta) ** (np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)))
  if scaling.kind == "linear":
    return (inv / f32(scaling.factor)).astype(f32)
  if scaling.kind != "llama3":
    raise ValueError(f"rope scaling {scaling.kind!r} is not known; choose one of: linear, llama3")
  factor, low, high = (
    f32(scaling.factor),
    f32(scaling.low_freq_factor),
    f32(scaling.high_freq_factor),
  )
  old = f32(scaling.original_max_len)
  low_wavelen, high_wavelen = old / low, old / high
  wavelen = f32(2 * math.pi) / inv
  scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(f32)


def apply_rope(
  x_bthk: jax.Array, positions_bt: jax.Array, theta: float, scaling: RopeScaling | None = None
) -> jax.Array:
  """Rotates pairs (x[i], x[i + d/2]) by angle position · θ^(-2i/d) (the "half" layout).

  Args:
    x_bthk: Queries or keys, [batch, seq, heads, head_dim].
    positions_bt: Integer positions, [batch, seq].
    theta: RoPE base.
    scaling: Optional frequency scaling (`RopeScaling`).

  Returns:
    The rotated array in the input dtype.
  """
  if scaling is None:
    freqs = rope_frequencies(x_bthk.shape[-1], theta)
  else:
    freqs = jnp.asarray(scaled_rope_frequencies(x_bthk.shape[-1], theta, scaling))
  angles = positions_bt.astype(jnp.float32)[..., None] * freqs  # [b, t, d/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_bthk.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthk.dtype)

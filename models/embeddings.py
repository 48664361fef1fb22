"""Token embeddings, the LMs' input side (`LMInputs`: learned positions, token types, embedding
norm), and rotary position embeddings (RoPE) with Llama 3.1 / linear RoPE scaling.

Axes: vocab, embed for the table; activations [batch, seq, embed].
"""

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reslm.models.registry import NORMS
from reslm.models.sharding import constrain, param


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


class LMInputs(nnx.Module):
  """The input side both LMs share: token, position and token-type embeddings, embedding norm
  (BERT's embeddings), and the final norm of a pre-norm stack.

  Sets `embed` (tokens; also the tied output projection), `pos_embed` (learned positions, rows
  max_seq_len + position_offset), `type_embed` (token types) and `embed_norm`, each None when
  the config has none.
  """

  def _init_inputs(self, cfg, rngs: nnx.Rngs) -> None:
    kw = dict(
      init_std=cfg.init_std, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs
    )
    self.embed = Embed(cfg.vocab_size, cfg.d_model, **kw)
    table = (None, "embed")  # Small tables: never split along their rows.
    learned = cfg.position == "learned"
    self.pos_embed = Embed(cfg.position_rows, cfg.d_model, axes=table, **kw) if learned else None
    types = cfg.type_vocab_size
    self.type_embed = Embed(types, cfg.d_model, axes=table, **kw) if types else None
    norm = cfg.embed_norm
    self.embed_norm = NORMS.build(cfg.norm, cfg, dim=cfg.d_model, rngs=rngs) if norm else None

  def embed_inputs(self, tokens_bt, positions_bt, token_types_bt=None) -> jax.Array:
    """The residual stream entering the first block, [batch, seq, embed].

    Args:
      tokens_bt: int32 token ids, [batch, seq].
      positions_bt: Positions, [batch, seq] (read by a learned position table).
      token_types_bt: Token types (BERT's segment A/B), [batch, seq]; default all 0.
    """
    x = self.embed(tokens_bt)
    if self.pos_embed is not None:
      x = x + self.pos_embed(positions_bt + self.cfg.position_offset)
    if self.type_embed is not None:
      types = jnp.zeros_like(tokens_bt) if token_types_bt is None else token_types_bt
      x = x + self.type_embed(types)
    if self.embed_norm is not None:
      x = self.embed_norm(x)
    return constrain(x, ("batch", "residual_seq", "embed"))

  def _final_norm(self, cfg, rngs: nnx.Rngs):
    if cfg.norm_position == "post":
      return None  # Every block already ends with a norm.
    return NORMS.build(cfg.norm, cfg, dim=cfg.d_model, rngs=rngs)

  def normed(self, x_btd: jax.Array) -> jax.Array:
    """The last block's output after the final norm (if any)."""
    return x_btd if self.final_norm is None else self.final_norm(x_btd)


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

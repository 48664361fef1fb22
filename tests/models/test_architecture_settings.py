"""The model settings pretrained checkpoints need, each against its definition: Llama 3.1's RoPE
scaling (Meta's reference loop), post-norm blocks, BERT-style inputs (learned positions with an
offset, token types, embedding norm), biased projections; and their one-line config errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reslm.models import ModelConfig, build_model
from reslm.models.embeddings import RopeScaling, scaled_rope_frequencies
from reslm.models.linear import Linear, fused_linear
from reslm.models.transformer import build_block
from tests.models.mixer_checks import normal, randomised


def meta_llama3_scaling(freqs, factor, low, high, old_len):
  """Meta's `apply_scaling` (llama-models, Llama 3.1), element by element in float64."""
  low_wavelen, high_wavelen = old_len / low, old_len / high
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
      out.append(freq)
    elif wavelen > low_wavelen:
      out.append(freq / factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def test_llama3_rope_scaling_matches_metas_reference():
  """Llama 3.1 8B's settings: head_dim 128, theta 5e5, factor 8, low 1, high 4, 8192."""
  theta, d = 500_000.0, 128
  base = 1.0 / theta ** (np.arange(0, d, 2) / d)
  ours = scaled_rope_frequencies(d, theta, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
  want = meta_llama3_scaling(base, 8.0, 1.0, 4.0, 8192)
  np.testing.assert_allclose(ours, want, rtol=2e-6)
  wavelen = 2 * math.pi / base
  assert (wavelen < 2048).any() and (wavelen > 8192).any()  # all three regimes occur
  assert ((wavelen >= 2048) & (wavelen <= 8192)).any()
  linear = scaled_rope_frequencies(d, theta, RopeScaling("linear", 4.0))
  np.testing.assert_allclose(linear, base / 4, rtol=2e-6)


TINY = dict(vocab_size=50, d_model=16, num_heads=2, num_layers=1, max_seq_len=12)


def test_post_norm_block_is_norm_of_the_residual_sum():
  cfg = ModelConfig(**TINY, norm="layernorm", norm_position="post", mlp="gelu")
  block = randomised(lambda: build_block(cfg, "dense", causal=False, rngs=nnx.Rngs(0)))
  x = jnp.asarray(normal((2, 5, 16)))
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  got, _, _ = block(x, positions_bt=pos)
  h = block.norm1(x + block.mixer(x, positions_bt=pos)[0])
  want = block.norm2(h + block.mlp(h))
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_bert_style_inputs_sum_tokens_offset_positions_and_types_then_norm():
  cfg = ModelConfig(
    **TINY, kind="encoder", position="learned", position_offset=2, type_vocab_size=2,
    embed_norm=True, norm="layernorm",
  )  # fmt: skip
  model = randomised(lambda: build_model(cfg))
  assert model.pos_embed.embedding.shape == (14, 16)  # max_seq_len + offset rows
  tokens = jnp.asarray([[3, 7, 9, 1]])
  types = jnp.asarray([[0, 0, 1, 1]])
  pos = jnp.arange(4)[None]
  got = model.embed_inputs(tokens, pos, types)
  table = lambda m: m.embedding[...]  # noqa: E731
  summed = (
    table(model.embed)[tokens] + table(model.pos_embed)[pos + 2] + table(model.type_embed)[types]
  )
  np.testing.assert_allclose(got, model.embed_norm(summed), atol=1e-6)
  assert model.final_norm is not None  # pre-norm (the default): a final norm


def test_biases_where_the_settings_put_them():
  shapes = lambda m: {  # noqa: E731
    "/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(m))
  }
  qwen = shapes(nnx.eval_shape(lambda: build_model(ModelConfig(**TINY, attention_bias="qkv"))))
  blocks = "layers/groups/blocks/0"
  assert qwen[f"{blocks}/mixer/q/bias"] == (1, 2, 8) and f"{blocks}/mixer/o/bias" not in qwen
  gpt = shapes(nnx.eval_shape(lambda: build_model(ModelConfig(**TINY, attention_bias="all"))))
  assert gpt[f"{blocks}/mixer/o/bias"] == (1, 16)
  llama = shapes(nnx.eval_shape(lambda: build_model(ModelConfig(**TINY, mlp_bias=True))))
  assert {f"{blocks}/mlp/{n}/bias" for n in ("gate", "up", "down")} <= set(llama)


def test_fused_projections_add_each_bias():
  layers = [
    randomised(lambda n=n: Linear(8, n, axes=("embed", "mlp"), use_bias=True, rngs=nnx.Rngs(0)), i)
    for i, n in enumerate((6, 6, 4))
  ]
  x = jnp.asarray(normal((3, 8)))
  for got, layer in zip(fused_linear(x, layers), layers, strict=True):
    np.testing.assert_allclose(got, x @ layer.kernel[...] + layer.bias[...], atol=1e-6)


@pytest.mark.parametrize(
  ("settings", "match"),
  [
    (dict(position_offset=2), r"^model\.position_offset=2 needs model\.position='learned'"),
    (
      dict(position="none", rope_scaling="llama3"),
      r"^model\.rope_scaling='llama3' needs model\.position='rope'",
    ),
    (
      dict(rope_scaling="yarn"),
      r"^model\.rope_scaling='yarn' is not known; choose one of: none, linear, llama3$",
    ),
    (
      dict(attention_bias="o"),
      r"^model\.attention_bias='o' is not known; choose one of: none, qkv, all$",
    ),
    (dict(norm_position="sandwich"), r"^model\.norm_position='sandwich' is not known"),
    (dict(pooler=True), r"^model\.pooler=True needs model\.kind='encoder'"),
    (dict(mlp="gelu", mlp_bias=True), r"^model\.mlp_bias=True applies to the swiglu MLP"),
    (
      dict(mlp="moe", mlp_activation="gelu"),
      r"^model\.mlp_activation='gelu' applies to the swiglu and gelu MLPs",
    ),
    (dict(rope_scaling="llama3", rope_low_freq_factor=4.0), r"rope_low_freq_factor=4\.0 and"),
    (dict(type_vocab_size=-1), r"^model\.type_vocab_size=-1 must be an integer >= 0$"),
  ],
)
def test_one_line_config_errors(settings, match):
  with pytest.raises(ValueError, match=match) as e:
    ModelConfig(**TINY, **settings)
  assert "\n" not in str(e.value)


def test_default_settings_change_nothing():
  """The new settings' defaults build exactly the parameters the models had before them."""
  model = nnx.eval_shape(lambda: build_model(ModelConfig(**TINY)))
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
  assert not any(n.startswith(("pos_embed", "type_embed", "embed_norm", "pooler")) for n in names)
  assert not any(n.endswith("bias") for n in names)
  assert jax.tree.leaves(nnx.state(model))  # a model with parameters

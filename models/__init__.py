"""Flax NNX layers and language models. Importing the package registers every built-in layer.

from reslm.models import ModelConfig, build_model
model = build_model(ModelConfig(vocab_size=256, d_model=128, num_layers=2, num_heads=4))
out = model(tokens)  # ModelOutput(logits, cache, aux_loss)
"""

from reslm.models import attention, hyena, mamba, mlp, moe, monarch, norms, rwkv  # noqa: F401  (registers layers)
from reslm.models.config import ModelConfig, get_default_config
from reslm.models.registry import MIXERS, MLPS, NORMS
from reslm.models.transformer import (
  Block,
  DecoderLM,
  EncoderLM,
  LayerStack,
  ModelOutput,
  build_model,
)

__all__ = [
  "MIXERS",
  "MLPS",
  "NORMS",
  "Block",
  "DecoderLM",
  "EncoderLM",
  "LayerStack",
  "ModelConfig",
  "ModelOutput",
  "build_model",
  "get_default_config",
]

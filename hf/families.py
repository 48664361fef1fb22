"""Hugging Face model families: config.json <-> `ModelConfig`, tensor names <-> parameter paths.

A family knows three things about its checkpoints:
  settings   config.json -> the `model.*` settings that reproduce the architecture (one-line
             ValueError for anything the model cannot honour: an unsupported rope scaling, cross
             attention, per-layer attention types, ...), and back (`hf_config`) for export;
  sources    for each of our parameters, which tensor holds it and how it is laid out there
             (`Source`: transposes, head splits, GPT-2's fused q/k/v), per layer into the stacked
             [layers, ...] arrays; `reader.py` reads device shards through it, `export.py`
             inverts it;
  leftovers  tensors a checkpoint may hold that the model does not use (buffers such as
             `rotary_emb.inv_freq`, a tied `lm_head.weight`, BERT's next-sentence head).

Families (`model_type`): llama (Llama 2/3, SmolLM, TinyLlama), mistral (sliding window), qwen2
(q/k/v biases): decoder, pre-norm RMSNorm, RoPE (+ linear / Llama-3 scaling), SwiGLU; gpt2:
learned positions, pre-norm LayerNorm, biased projections stored as transposed `Conv1D`s with q/k/v
fused, gelu_new, tied head; bert, roberta (MiniLM is a bert): post-norm encoder, learned positions
(RoBERTa's offset by pad_token_id + 1), token types, embedding LayerNorm, exact gelu, masked-LM
head tied to the embeddings, pooler.

Deviations (also in README): RoBERTa numbers positions pad_token_id + 1 + i for the i-th token of
a row; HF skips pad tokens when counting (identical for right-padded rows, which is what the data
pipeline makes). A checkpoint without a masked-LM head (a bare `BertModel`) gets a freshly
initialised head (N(0, initializer_range), as `transformers` does), named in a warning.
"""

from typing import Any

from reslm.hf.bert import Bert
from reslm.hf.gpt2 import GPT2
from reslm.hf.layout import Path, Source
from reslm.hf.llama import Llama
from reslm.models.config import ModelConfig

__all__ = ["GPT2", "Bert", "Llama", "Path", "Source"]

FAMILIES = {t: family for family in (Llama, GPT2, Bert) for t in family.model_types}
SUPPORTED = tuple(FAMILIES)


def family_of(model_type: Any):
  """The family class of a config.json `model_type`; a one-line error lists the supported."""
  if model_type not in FAMILIES:
    raise ValueError(
      f"config.json model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED)}"
    )
  return FAMILIES[model_type]


def sources_for(model_type: str, cfg: ModelConfig) -> dict[Path, Source]:
  family = family_of(model_type)
  return family.sources(cfg, model_type) if family is Bert else family.sources(cfg)


def hf_config_for(model_type: str, cfg: ModelConfig) -> dict[str, Any]:
  family = family_of(model_type)
  return family.hf_config(cfg, model_type) if family is Bert else family.hf_config(cfg)


def base_prefix(model_type: str) -> str:
  family = family_of(model_type)
  return family.base_prefix(model_type) if family is Bert else family.base


def infer_model_type(cfg: ModelConfig) -> str:
  """The family a model config exports as (for runs trained here), or a one-line error."""
  if cfg.kind == "encoder":
    candidates = ["roberta" if cfg.position_offset else "bert"]
  elif cfg.position == "learned":
    candidates = ["gpt2"]
  else:
    candidates = ["llama"]
  model_type = candidates[0]
  family = family_of(model_type)
  why = family.check(cfg, model_type) if family is Bert else family.check(cfg)
  if why is not None:
    raise ValueError(
      f"this model cannot be written as a Hugging Face checkpoint: {why}; exportable families: "
      f"{', '.join(SUPPORTED)}"
    )
  return model_type

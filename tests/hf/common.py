"""The Hugging Face golden fixtures (tests/fixtures/make_hf_fixtures.py) and how to score them.

Each fixture directory holds a tiny randomly initialised `transformers` model (config.json,
safetensors, tokenizer.json) and golden.npz: its inputs and the float32 outputs `transformers`
computed for them (logits; for encoders the pooled output and the mean of the last hidden states
over real tokens).
"""

import functools
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from reslm.hf.reader import HFCheckpoint

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
DECODERS = (
  "llama_gqa_untied",
  "llama_mha_tied_bf16",
  "llama3_rope_scaling",
  "qwen2_bias",
  "mistral_window",
  "gpt2",
)
ENCODERS = ("bert_pretraining", "minilm_model", "roberta_mlm")
ALL = DECODERS + ENCODERS
F32_TOL = 1e-4  # Max abs error against float32 golden outputs.


def bf16_tol(reference: np.ndarray) -> float:
  """bfloat16 computation: 8 units of bf16's epsilon (2^-8) times the outputs' scale."""
  return 8 * 2.0**-8 * max(1.0, float(np.abs(reference).max()))


def golden(name: str) -> dict[str, np.ndarray]:
  with np.load(FIXTURES / name / "golden.npz") as f:
    return dict(f)


@functools.cache
def load(name: str, dtype: str = "float32"):
  """(checkpoint, model) of a fixture, computing in `dtype`; cached across tests."""
  ckpt = HFCheckpoint(FIXTURES / name, dtype=dtype)
  return ckpt, ckpt.load()


@nnx.jit
def _decoder_logits(model, ids):
  return model(ids).logits


@nnx.jit
def _encoder_outputs(model, ids, mask, types):
  hidden, _ = model.hidden_states(ids, segment_ids_bt=mask, token_types_bt=types)
  out = {"logits": model.project_logits(hidden, normed=True)}
  if model.pooler is not None:
    out["pooled"] = model.pool(hidden)
  out["mean_pooled"] = model.sentence_embeddings(ids, mask, token_types_bt=types)
  return out


def outputs(model, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """What the fixture's golden.npz holds, computed by `model` on its inputs."""
  ids = jnp.asarray(g["input_ids"], jnp.int32)
  if "attention_mask" not in g:
    return {"logits": np.asarray(_decoder_logits(model, ids), np.float32)}
  mask = jnp.asarray(g["attention_mask"], jnp.int32)
  types = jnp.asarray(g["token_type_ids"], jnp.int32)
  out = _encoder_outputs(model, ids, mask, types)
  return {k: np.asarray(v, np.float32) for k, v in out.items() if k in g}


def errors(model, g: dict[str, np.ndarray]) -> dict[str, float]:
  """Max abs error per golden output; encoder logits over real (unpadded) tokens only, as
  padded positions' outputs mean nothing in either implementation."""
  out = {}
  for key, value in outputs(model, g).items():
    diff = np.abs(value - g[key])
    if key == "logits" and "attention_mask" in g:
      diff = diff[g["attention_mask"].astype(bool)]
    out[key] = float(diff.max())
  return out

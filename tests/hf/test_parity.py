"""Imported Hugging Face checkpoints reproduce `transformers`' outputs (golden logits, pooled and
mean-pooled embeddings) for every family, in float32 and bfloat16; with torch and transformers
installed the same checks also run against the live models."""

import numpy as np
import pytest

from reslm.hf.reader import HFCheckpoint
from tests.hf.common import (
  ALL,
  DECODERS,
  ENCODERS,
  F32_TOL,
  FIXTURES,
  bf16_tol,
  errors,
  golden,
  load,
  outputs,
)
from tests.models.mixer_checks import check_decoding


@pytest.mark.parametrize("name", ALL)
def test_float32_matches_transformers_golden_outputs(name):
  _, model = load(name)
  g = golden(name)
  errs = errors(model, g)
  assert set(errs) == {k for k in ("logits", "pooled", "mean_pooled") if k in g}
  assert max(errs.values()) <= F32_TOL, errs


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_compute_within_a_bf16_tolerance(name):
  _, model = load(name, "bfloat16")
  g = golden(name)
  for key, err in errors(model, g).items():
    assert err <= bf16_tol(g[key]), (key, err, bf16_tol(g[key]))


# What each fixture exists to exercise: an import that ignored the setting would fail parity.
FEATURES = {
  "llama_gqa_untied": dict(num_heads=4, num_kv_heads=2, tie_embeddings=False, norm_eps=1e-5),
  "llama_mha_tied_bf16": dict(num_kv_heads=4, tie_embeddings=True, param_dtype="bfloat16"),
  "llama3_rope_scaling": dict(
    rope_scaling="llama3", rope_theta=500000.0, rope_scaling_factor=8.0, rope_original_max_len=16
  ),
  "qwen2_bias": dict(attention_bias="qkv"),
  "mistral_window": dict(mixer="sliding_window", mixer_options=(("window", 6),)),
  "gpt2": dict(position="learned", norm="layernorm", attention_bias="all", mlp="gelu"),
  "bert_pretraining": dict(norm_position="post", embed_norm=True, type_vocab_size=2, pooler=True),
  "minilm_model": dict(kind="encoder", pooler=True),
  "roberta_mlm": dict(position_offset=2, type_vocab_size=1, pooler=False),
}


@pytest.mark.parametrize("name", ALL)
def test_fixture_exercises_its_feature(name):
  ckpt, _ = load(name)
  for key, value in FEATURES[name].items():
    assert getattr(ckpt.cfg, key) == value, key
  assert ckpt.cfg.mlp_activation == {"gpt2": "gelu_tanh"}.get(
    name, "gelu" if name in ENCODERS else "silu"
  )


def test_sharded_index_is_read():
  assert (FIXTURES / "llama_gqa_untied" / "model.safetensors.index.json").exists()
  assert len(list((FIXTURES / "llama_gqa_untied").glob("model-*.safetensors"))) > 1


def test_notes_name_what_was_not_imported_or_initialised():
  bert, _ = load("bert_pretraining")
  assert bert.notes == [
    "not imported (no such head here): cls.seq_relationship.bias, cls.seq_relationship.weight"
  ]
  minilm, _ = load("minilm_model")
  assert len(minilm.notes) == 1 and "no masked-LM head" in minilm.notes[0]
  assert load("roberta_mlm")[0].notes == []


@pytest.mark.parametrize("name", ["gpt2", "qwen2_bias", "mistral_window", "llama3_rope_scaling"])
def test_cached_decoding_equals_the_full_forward(name):
  """Learned positions, biases, the sliding window and scaled RoPE decode token by token."""
  _, model = load(name)
  ids = golden(name)["input_ids"].astype(np.int32)
  full = outputs(model, {"input_ids": ids})["logits"]
  check_decoding(model, ids, full, prefill=3, max_len=ids.shape[1])


@pytest.mark.parametrize("name", ALL)
def test_live_transformers_model_matches(name):
  """The same comparison against the model `transformers` loads from the fixture (not the saved
  logits), where torch and transformers are installed."""
  torch = pytest.importorskip("torch", reason="torch is not installed (golden files cover it)")
  transformers = pytest.importorskip("transformers", reason="transformers is not installed")
  g = golden(name)
  cls = transformers.AutoModelForCausalLM if name in DECODERS else transformers.AutoModel
  arch = HFCheckpoint(FIXTURES / name).hf_config["architectures"][0]
  cls = getattr(transformers, arch, cls)
  ref = cls.from_pretrained(FIXTURES / name, dtype=torch.float32).eval()
  kwargs = {k: torch.tensor(v) for k, v in g.items() if k in ("input_ids", "attention_mask")}
  if "token_type_ids" in g:
    kwargs["token_type_ids"] = torch.tensor(g["token_type_ids"])
  with torch.no_grad():
    out = ref(**kwargs, output_hidden_states=True)
  live = {}
  for attr in ("logits", "prediction_logits"):
    if getattr(out, attr, None) is not None:
      live["logits"] = out[attr].float().numpy()
  _, model = load(name)
  ours = outputs(model, g)
  mask = g.get("attention_mask", np.ones(g["input_ids"].shape)).astype(bool)
  if "logits" in live:
    assert np.abs(ours["logits"] - live["logits"])[mask].max() <= F32_TOL
  if "mean_pooled" in ours:
    hidden = out.hidden_states[-1].float().numpy()
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    assert np.abs(ours["mean_pooled"] - mean).max() <= F32_TOL

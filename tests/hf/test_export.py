"""Export back to the Hugging Face format: import -> export -> import gives identical parameters
and the golden outputs (and `transformers` reads the export, where installed); a sharded import
on 8 devices equals the unsharded one; compressed models are written dequantised; models no
family represents are refused."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from reslm.compress.rules import apply_rules
from reslm.hf.export import export as export_model
from reslm.hf.reader import HFCheckpoint
from reslm.hf.weights import INDEX
from reslm.models import ModelConfig, build_model
from reslm.parallel import mesh as mesh_lib
from reslm.training import loop
from reslm.training.config import get_train_defaults
from tests.hf.common import ALL, F32_TOL, FIXTURES, errors, golden, load, outputs


def _params(model) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """Every fixture imported and exported once (small shards: several files and an index)."""
  out = {}
  for name in ALL:
    ckpt, model = load(name)
    path = tmp_path_factory.mktemp(name)
    meta = {"model_type": ckpt.model_type, "config": ckpt.hf_config}
    tokenizer = (FIXTURES / name / "tokenizer.json").read_text()
    export_model(model, path, hf_meta=meta, tokenizer_json=tokenizer, max_shard_bytes=40_000)
    out[name] = path
  return out


@pytest.mark.parametrize("name", ALL)
def test_round_trip_is_identical(name, exported):
  ckpt, model = load(name)
  again = HFCheckpoint(exported[name], dtype="float32")
  assert again.cfg == ckpt.cfg
  assert (exported[name] / INDEX).exists()  # 40 kB shards: written as several files.
  reloaded = again.load()
  ours, theirs = _params(model), _params(reloaded)
  assert ours.keys() == theirs.keys()
  for key, value in ours.items():
    assert value.dtype == theirs[key].dtype and np.array_equal(value, theirs[key]), key
  assert max(errors(reloaded, golden(name)).values()) <= F32_TOL


@pytest.mark.parametrize("name", ALL)
def test_exported_config_keeps_the_checkpoints_fields(name, exported):
  original = json.loads((FIXTURES / name / "config.json").read_text())
  written = json.loads((exported[name] / "config.json").read_text())
  for key in ("model_type", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
    assert written.get(key) == original.get(key), key
  assert (exported[name] / "tokenizer.json").read_text() == (
    FIXTURES / name / "tokenizer.json"
  ).read_text()


@pytest.mark.parametrize("name", ["llama_gqa_untied", "gpt2", "bert_pretraining", "roberta_mlm"])
def test_transformers_reads_the_export(name, exported):
  """Where torch and transformers are installed: the exported directory loads there and gives
  the golden logits."""
  torch = pytest.importorskip("torch", reason="torch is not installed (the importer checks it)")
  transformers = pytest.importorskip("transformers", reason="transformers is not installed")
  arch = json.loads((exported[name] / "config.json").read_text())["architectures"][0]
  ref = getattr(transformers, arch).from_pretrained(exported[name], dtype=torch.float32).eval()
  g = golden(name)
  kwargs = {
    k: torch.tensor(g[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in g
  }
  with torch.no_grad():
    logits = ref(**kwargs).logits.numpy()
  mask = g.get("attention_mask", np.ones(g["input_ids"].shape)).astype(bool)
  assert np.abs(logits - g["logits"])[mask].max() <= F32_TOL


@pytest.mark.parametrize("name", ["llama_gqa_untied", "gpt2", "bert_pretraining"])
def test_sharded_import_on_8_devices_equals_unsharded(name):
  """fsdp 4 x tensor 2: embed rows/columns, heads, kv heads and MLP columns split (GPT-2's fused
  q/k/v read per head shard); every device holds exactly its slice of the unsharded arrays."""
  ckpt, model = load(name)
  pcfg = mesh_lib.get_default_config()
  pcfg.update(data=1, fsdp=4, tensor=2, rules="fsdp_tp")
  mesh = mesh_lib.make_mesh(pcfg, jax.devices()[:8])
  place = loop.placement(ckpt.cfg, get_train_defaults(), pcfg, mesh)
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), place.specs)
  sharded = HFCheckpoint(FIXTURES / name, dtype="float32").load(shardings)
  state = nnx.to_pure_dict(nnx.state(sharded))
  split = [a for a in jax.tree.leaves(state) if not a.sharding.is_fully_replicated]
  assert len(split) >= 8  # The preset really splits the parameters.
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
    assert got.sharding == want
  ours = _params(model)
  for key, value in _params(sharded).items():
    assert np.array_equal(value, ours[key]), key


def test_compressed_model_is_written_dequantised(tmp_path):
  """int8 MLP weights and an int8 KV cache: the export holds the dequantised weights (the
  reimported model computes what the compressed one does) and says what it changed."""
  ckpt, _ = load("qwen2_bias")
  model = HFCheckpoint(FIXTURES / "qwen2_bias", dtype="float32").load()
  rules = [{"path": r".*/mlp/.*", "method": "int8"}, {"path": r".*/mixer", "method": "kv_int8"}]
  apply_rules(model, rules)
  notes = export_model(model, tmp_path, hf_meta={"model_type": "qwen2"})
  assert sorted(notes) == sorted(
    [
      f"layers/groups/blocks/0/mlp/{n}: int8 weights written dequantised"
      for n in ("gate", "up", "down")
    ]
    + ["layers/groups/blocks/0/mixer: int8 KV cache dropped (a runtime setting HF configs lack)"]
  )
  reloaded = HFCheckpoint(tmp_path, dtype="float32").load()
  ids = {"input_ids": golden("qwen2_bias")["input_ids"]}
  want = outputs(model, ids)["logits"]
  np.testing.assert_allclose(outputs(reloaded, ids)["logits"], want, atol=1e-3, rtol=0)
  assert np.abs(want - golden("qwen2_bias")["logits"]).max() > 1e-3  # int8 changed the model


def test_a_model_trained_here_exports_as_its_family(tmp_path):
  """No imported config: a Llama-shaped run is written as a llama checkpoint and reads back."""
  cfg = ModelConfig(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32,
    tie_embeddings=False,
  )  # fmt: skip
  model = build_model(cfg)
  export_model(model, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
  again = HFCheckpoint(tmp_path)
  # The import spells out what the config left to defaults (head_dim 0, activation "auto").
  assert again.cfg == dataclasses.replace(cfg, head_dim=8, mlp_activation="silu")
  ours, theirs = _params(model), _params(again.load())
  assert all(np.array_equal(v, theirs[k]) for k, v in ours.items())


@pytest.mark.parametrize(
  ("settings", "match"),
  [
    (dict(mixer="mamba"), r"model\.mixer='mamba'"),
    (dict(mlp="moe", mlp_options={"num_experts": 2}), r"model\.mlp='moe'"),
    (dict(norm="layernorm"), r"model\.norm='layernorm'"),
  ],
)
def test_models_no_family_represents_are_refused(tmp_path, settings, match):
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, **settings)
  model = nnx.eval_shape(lambda: build_model(cfg))
  with pytest.raises(
    ValueError, match=r"cannot be written as a Hugging Face checkpoint: " + match
  ) as e:
    export_model(model, tmp_path / "out")
  assert "\n" not in str(e.value)
  assert not (tmp_path / "out").exists()  # Refused before anything is written.

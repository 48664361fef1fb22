"""Every bad Hugging Face input is one ValueError line naming the problem, raised before any
weight is read (the reader's `read` is made to fail, so reaching it would show)."""

import json
import shutil

import pytest
from safetensors.numpy import load_file, save_file

from reslm.hf import weights
from reslm.hf.reader import HFCheckpoint
from tests.hf.common import FIXTURES


@pytest.fixture(autouse=True)
def no_weight_reads(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("a weight was read before the checks")

  monkeypatch.setattr(weights.WeightFile, "read", fail)


def copy(tmp_path, name):
  dest = tmp_path / name
  shutil.copytree(FIXTURES / name, dest)
  return dest


def edit_config(path, **changes):
  cfg = json.loads((path / "config.json").read_text())
  for key, value in changes.items():
    if value is None:
      cfg.pop(key, None)
    else:
      cfg[key] = value
  (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, change):
  file = path / "model.safetensors"
  tensors = load_file(file)
  change(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def one_line_error(path, match):
  with pytest.raises(ValueError, match=match) as e:
    HFCheckpoint(path)
  assert "\n" not in str(e.value)


def test_unknown_model_type_lists_the_supported(tmp_path):
  path = copy(tmp_path, "gpt2")
  edit_config(path, model_type="mamba")
  one_line_error(
    path,
    r"^config\.json model_type='mamba' is not supported; supported: llama, mistral, qwen2, gpt2, "
    r"bert, roberta$",
  )


def test_missing_tensor_is_named_with_its_shape(tmp_path):
  path = copy(tmp_path, "qwen2_bias")
  edit_tensors(path, lambda t: t.pop("model.layers.1.self_attn.q_proj.bias"))
  one_line_error(
    path, r"tensor 'model\.layers\.1\.self_attn\.q_proj\.bias' \(shape \[32\]\) is missing"
  )


def test_unexpected_tensor_is_named_with_its_shape(tmp_path):
  import numpy as np

  path = copy(tmp_path, "qwen2_bias")
  edit_tensors(
    path, lambda t: t.update({"model.layers.0.self_attn.extra": np.zeros(3, np.float32)})
  )
  one_line_error(path, r"unexpected tensor 'model\.layers\.0\.self_attn\.extra' with shape \[3\]")


def test_mismatched_tensor_shape_against_the_config(tmp_path):
  path = copy(tmp_path, "mistral_window")
  edit_config(path, intermediate_size=48)
  one_line_error(
    path,
    r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[64, 32\] but config\.json implies \[48, 32\]",
  )


@pytest.mark.parametrize(
  ("name", "changes", "match"),
  [
    (
      "llama_gqa_untied",
      {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
      r"rope scaling type 'yarn' is not supported; supported: default, linear, llama3",
    ),
    (
      "llama3_rope_scaling",
      {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
      r"rope scaling type 'dynamic' is not supported",
    ),
    ("llama_gqa_untied", {"hidden_act": "gelu_fast"}, r"hidden_act='gelu_fast' is not supported"),
    (
      "qwen2_bias",
      {
        "layer_types": ["full_attention", "sliding_attention"],
        "use_sliding_window": True,
        "sliding_window": 4,
        "max_window_layers": 0,
      },
      r"layer_types mixes \['full_attention', 'sliding_attention'\]",
    ),
    (
      "gpt2",
      {"scale_attn_by_inverse_layer_idx": True},
      r"scale_attn_by_inverse_layer_idx=True cannot be honoured: per-layer attention scaling",
    ),
    (
      "bert_pretraining",
      {"position_embedding_type": "relative_key"},
      r"position_embedding_type='relative_key' cannot be honoured",
    ),
    ("roberta_mlm", {"hidden_size": None}, r"config\.json has no 'hidden_size'"),
  ],
)
def test_config_fields_the_model_cannot_honour(tmp_path, name, changes, match):
  path = copy(tmp_path, name)
  edit_config(path, **changes)
  one_line_error(path, match)


def test_truncated_safetensors_file(tmp_path):
  path = copy(tmp_path, "mistral_window")
  file = path / "model.safetensors"
  file.write_bytes(file.read_bytes()[:-100])
  one_line_error(
    path, r"model\.safetensors is truncated: its tensors need \d+ bytes, the file has \d+"
  )


def test_missing_shard_of_an_index(tmp_path):
  path = copy(tmp_path, "llama_gqa_untied")
  (path / "model-00002-of-00003.safetensors").unlink()
  one_line_error(path, r"names a missing shard model-00002-of-00003\.safetensors")


def test_directory_with_no_weights(tmp_path):
  path = copy(tmp_path, "gpt2")
  (path / "model.safetensors").unlink()
  one_line_error(
    path, r"has no weights: neither model\.safetensors nor model\.safetensors\.index\.json"
  )


def test_directory_with_no_config(tmp_path):
  path = copy(tmp_path, "gpt2")
  (path / "config.json").unlink()
  one_line_error(path, r"has no config\.json")

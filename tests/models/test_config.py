"""Model config: hashable, namespaced module options."""

import pytest

from reslm.models.config import ModelConfig


def test_options_namespaced_per_mixer_in_a_hybrid():
  from reslm.models.registry import MIXERS, module_options

  cfg = ModelConfig(
    mixer="linear,dense", num_layers=2, mixer_options={"linear": {"chunk_size": 16}}
  )
  assert hash(cfg) == hash(
    ModelConfig(mixer="linear,dense", num_layers=2, mixer_options={"linear": {"chunk_size": 16}})
  )
  assert cfg.to_dict()["mixer_options"] == {"linear": {"chunk_size": 16}}
  opts = dict(setting="model.mixer_options", registry=MIXERS)
  assert module_options(cfg.mixer_options, "linear", {"chunk_size": 64}, **opts) == {
    "chunk_size": 16
  }
  assert module_options(cfg.mixer_options, "dense", {"implementation": "xla"}, **opts) == {
    "implementation": "xla"
  }
  flat = ModelConfig(mixer="linear,dense", num_layers=2, mixer_options={"chunk_size": 16})
  with pytest.raises(ValueError, match=r"chunk_size is not a setting of sequence mixer 'dense'"):
    module_options(flat.mixer_options, "dense", {"implementation": "xla"}, **opts)

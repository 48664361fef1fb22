"""Decode-exactness declarations: every registered mixer and MLP says whether its cached decoding
equals the full forward, and `decode_notes` / `check_decodable` read them for `generate`."""

import numpy as np
import pytest
from flax import nnx

from reslm.models import MIXERS, MLPS, ModelConfig, build_model
from reslm.models.decoding import check_decodable, decode_notes
from tests.models.mixer_checks import (
  check_decoding,
  check_one_line_error,
  first_block,
  logits,
  tokens,
)

TINY = dict(vocab_size=37, d_model=32, num_layers=1, num_heads=4, max_seq_len=48)


def shapes_only(cfg):
  return nnx.eval_shape(lambda: build_model(cfg))


def declared(module):
  """The module's `decode_inexact`, checked to be None or a one-line reason."""
  reason = getattr(module, "decode_inexact", "undeclared")
  assert reason is None or (isinstance(reason, str) and "\n" not in reason), reason
  assert reason != "undeclared", f"{type(module).__name__} does not declare decode_inexact"
  return reason


@pytest.mark.parametrize(
  ("setting", "name"),
  [("mixer", n) for n in MIXERS.names()] + [("mlp", n) for n in MLPS.names()],
)
def test_every_layer_declares_and_declared_exact_decoding_is_exact(setting, name):
  """Each registered mixer and MLP declares `decode_inexact`; where it claims exactness, a tiny
  decoder's cached decoding (prefill 3, then token by token) equals its full forward. 40 tokens:
  more than a sampled mixer's default 32 samples, which would otherwise enumerate every key."""
  try:
    model = build_model(ModelConfig(**TINY, **{setting: name}))
  except ValueError:  # Refused in a decoder (e.g. a non-causal mixer): nothing to decode.
    pytest.skip(f"{setting}={name} does not build in a decoder")
  block = first_block(model)
  if declared(getattr(block, setting)) is None:
    x = tokens(b=1, t=40)
    check_decoding(model, x, np.asarray(logits(model, x)), prefill=3, max_len=48)


@pytest.mark.parametrize(
  "kw",
  [
    dict(),
    dict(mixer="mamba"),
    dict(mixer="rwkv", mlp="rwkv_cmix"),
    dict(mlp="moe", mlp_options={"num_experts": 4}),  # dropless: the decoder default
  ],
)
def test_exact_models_have_no_notes(kw):
  model = shapes_only(ModelConfig(**TINY, **kw))
  check_decodable(model)
  assert decode_notes(model) == []


def test_inexact_layers_are_noted_once_each_with_their_setting():
  options = {"num_experts": 4, "top_k": 2, "dispatch": "capacity", "capacity_factor": 1.0}
  model = shapes_only(ModelConfig(**{**TINY, "num_layers": 2}, mlp="moe", mlp_options=options))
  notes = decode_notes(model)
  assert len(notes) == 1 and notes[0].startswith("model.mlp=moe: cached decoding differs")
  assert "capacity dispatch" in notes[0] and "\n" not in notes[0]


def test_int8_kv_cache_is_noted():
  model = shapes_only(ModelConfig(**TINY))
  model.layers.groups.blocks[0].mixer.kv_cache_quant = "int8"
  (note,) = decode_notes(model)
  assert note.startswith("model.mixer=dense:") and "int8 KV cache" in note


def test_an_undeclared_layer_is_noted_not_assumed_exact():
  model = shapes_only(ModelConfig(**TINY))
  model.layers.groups.blocks[0].mlp = nnx.Dict()
  (note,) = decode_notes(model)
  assert "does not declare" in note


def test_encoders_and_cacheless_mixers_cannot_decode():
  encoder = shapes_only(ModelConfig(**TINY, kind="encoder"))
  check_one_line_error(lambda: check_decodable(encoder), r"needs a decoder LM .*'encoder'")
  model = shapes_only(ModelConfig(**TINY))
  model.layers.groups.blocks[0].mixer = nnx.Dict()
  check_one_line_error(lambda: check_decodable(model), r"model.mixer='dense' cannot decode")

"""Calibration: deterministic sequences, and captured inputs that are each layer's real inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reslm import data as data_lib
from reslm.compress import calibration_tokens, capture_inputs, find_targets
from reslm.models import build_model
from tests.compress.common import CFG  # stacked: the capture must keep layers apart, in order


def data_config(**overrides):
  cfg = data_lib.get_default_config()
  cfg.update(source="mqar", seq_len=16, batch_size=4, vocab_size=64, **overrides)
  cfg.mqar.num_kv_pairs = 2
  return cfg


def test_calibration_tokens_are_fixed_train_sequences():
  cfg = data_config()
  a = calibration_tokens(cfg, num_sequences=6, first_step=1)
  np.testing.assert_array_equal(a, calibration_tokens(cfg, num_sequences=6, first_step=1))
  dataset = data_lib.build_dataset(cfg)
  expected = np.concatenate([dataset.train_batch(1)["inputs"], dataset.train_batch(2)["inputs"]])
  np.testing.assert_array_equal(a, expected[:6])
  b = calibration_tokens(cfg, num_sequences=3, seq_len=8, overrides={"seed": 5})
  assert b.shape == (3, 8) and b.dtype == np.int32


@pytest.fixture(scope="module")
def captured():
  model = build_model(CFG)
  tokens = calibration_tokens(data_config(), num_sequences=6)
  targets = {t.name: t for t in find_targets(model)}
  names = [f"layers/groups/blocks/{i}/{p}" for i in (0, 1) for p in ("mlp/gate", "mlp/down")]
  names.append("layers/groups/blocks/0/mixer/q")
  x = capture_inputs(model, [targets[n] for n in names], tokens, batch_size=4)
  return model, tokens, targets, x


def test_capture_shapes_and_model_restored(captured):
  model, tokens, targets, x = captured
  assert x["layers/groups/blocks/1/mlp/down"].shape == (2, 6 * 16, CFG.mlp_dim)
  assert x["layers/groups/blocks/0/mixer/q"].shape == (2, 6 * 16, 32)
  for name, t in targets.items():  # the recorders are gone
    node = model
    for key in t.path:
      node = node[key] if isinstance(key, int) else getattr(node, key)
    assert node is t.module, name


def test_captured_inputs_are_each_layers_inputs(captured):
  model, tokens, targets, x = captured
  for i in (0, 1):
    gate_in = jnp.asarray(x[f"layers/groups/blocks/{i}/mlp/gate"])  # [layers, tokens, d]
    down_in = jnp.asarray(x[f"layers/groups/blocks/{i}/mlp/down"])
    mlp = model.layers.groups.blocks[i].mlp
    wg, wu = mlp.gate.kernel[...], mlp.up.kernel[...]  # [layers, d, hidden]
    # down's input is silu(gate(x)) * up(x) of the same layer's gate input (SwiGLU).
    expected = jax.nn.silu(gate_in @ wg) * (gate_in @ wu)
    np.testing.assert_allclose(down_in, expected, rtol=1e-4, atol=1e-6)
  # The first layer's attention input is norm1(embed(tokens)).
  block = model.layers.groups.blocks[0]
  g, s = nnx.split(block.norm1)
  norm1 = nnx.merge(g, jax.tree.map(lambda a: a[0], s))
  expected = norm1(model.embed(jnp.asarray(tokens))).reshape(-1, 32)
  np.testing.assert_allclose(x["layers/groups/blocks/0/mixer/q"][0], expected, rtol=1e-5, atol=1e-6)


def test_capture_keeps_evenly_spaced_tokens(captured):
  model, tokens, targets, x = captured
  t = targets["layers/groups/blocks/0/mlp/gate"]
  few = capture_inputs(model, [t], tokens, batch_size=6, max_tokens=10)[t.name]
  rows = np.linspace(0, 6 * 16 - 1, 10).round().astype(int)
  np.testing.assert_allclose(few, x[t.name][:, rows], rtol=1e-5, atol=1e-6)

"""Pruning: exact sparsity / N:M patterns, scores as defined, layer error against magnitude, and
composition with quantization through the rules."""

import jax.numpy as jnp
import numpy as np
import pytest

from reslm.compress import apply_plan, make_plan
from reslm.compress.prune import common
from reslm.compress.prune.magnitude import global_masks
from reslm.compress.prune.sparsegpt import sparsegpt_prune
from reslm.compress.prune.wanda import scores
from reslm.compress.quantize import Int8Linear
from reslm.compress.quantize.gptq import hessian
from reslm.compress.registry import METHODS
from reslm.models import build_model
from tests.compress.common import CFG, random_calibration

OUTLIERS = [1, 10, 22, 43, 57]  # Spread over different 2:4 groups.


def layer(k=64, n=24, m=256, seed=0):
  """Weights and correlated inputs with a few outlier input channels (x20), as in LLMs."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(k, k)) / np.sqrt(k)
  x = rng.normal(size=(m, k)) @ mix + 0.1 * rng.normal(size=(m, k))
  x[:, [c for c in OUTLIERS if c < k]] *= 20.0
  w = rng.normal(size=(k, n))
  return jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)


def run(name, w, x, **settings):
  if name == "sparsegpt":
    settings.setdefault("block_size", 16)
  return METHODS[name].fn(w, x, METHODS[name].settings(settings, "t")).w


def out_error(x, w, w_hat):
  return float(jnp.linalg.norm(x @ (w - w_hat)) / jnp.linalg.norm(x @ w))


METHOD_NAMES = ("magnitude", "wanda", "sparsegpt")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_exact_sparsity_and_n_m_pattern(name):
  w, x = layer()
  # 25% of 64 rows per column, of 16-row blocks x 24 columns, of the layer: all integers.
  w_hat = run(name, w, x, sparsity=0.25)
  assert int(jnp.sum(w_hat == 0)) == w.size // 4
  kept = w_hat != 0
  if name != "sparsegpt":  # Only SparseGPT updates the weights it keeps.
    np.testing.assert_array_equal(w_hat, jnp.where(kept, w, 0.0))
  # 2:4 along the inputs of each output, K = 42: ten full groups and a partial group of 2.
  w_hat = run(name, w[:42], x[:, :42], n_m="2:4")
  nz = np.asarray(w_hat != 0)
  assert (nz[:40].reshape(10, 4, -1).sum(axis=1) == 2).all()
  assert nz[40:].all()  # The partial group keeps at most N = 2: both rows.


def test_kept_weights_score_highest():
  """Magnitude ranks |w| over the layer; Wanda ranks |w|·‖x_k‖ within each output."""
  w, x = layer()
  keep = np.asarray(run("magnitude", w, x, sparsity=0.5) != 0)
  a = np.abs(np.asarray(w))
  assert a[keep].min() >= a[~keep].max()
  keep = np.asarray(run("wanda", w, x, sparsity=0.5) != 0)
  s = np.abs(np.asarray(w)) * np.linalg.norm(np.asarray(x), axis=0)[:, None]
  np.testing.assert_allclose(scores(w, x), s, rtol=1e-5)
  for col in range(w.shape[1]):
    assert keep[:, col].sum() == 32 and s[keep[:, col], col].min() >= s[~keep[:, col], col].max()


def test_sparsegpt_lazy_blocks_equal_row_by_row():
  """N:M masks come from the updated weights; lazy block updates must not change them."""
  w, x = layer(k=32)
  h = hessian(x)
  a = sparsegpt_prune(w, h, n_m=(2, 4), block_size=8)
  b = sparsegpt_prune(w, h, n_m=(2, 4), block_size=32)
  np.testing.assert_array_equal(a == 0, b == 0)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # Nothing to prune: the weights are unchanged.
  np.testing.assert_allclose(sparsegpt_prune(w, h, sparsity=0.0, block_size=16), w, atol=1e-5)


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n_m": "2:4"}])
def test_calibrated_methods_beat_magnitude(pattern):
  w, x = layer()
  err = {name: out_error(x, w, run(name, w, x, **pattern)) for name in METHOD_NAMES}
  assert err["wanda"] < 0.5 * err["magnitude"]
  assert err["sparsegpt"] < 0.5 * err["magnitude"]


def test_settings_are_checked():
  with pytest.raises(ValueError, match="give one"):
    METHODS["wanda"].settings({"sparsity": 0.5, "n_m": "2:4"}, "r")
  with pytest.raises(ValueError, match="n_m='4:2' is not allowed"):
    METHODS["magnitude"].settings({"n_m": "4:2"}, "r")
  with pytest.raises(ValueError, match="sparsity=1.0 is not allowed"):
    METHODS["sparsegpt"].settings({"sparsity": 1.0}, "r")
  assert common.pattern(METHODS["wanda"].settings({}, "r")) == (0.5, None)


def test_global_magnitude_threshold_spans_layers():
  rng = np.random.default_rng(1)
  ws = [rng.normal(size=(3, 8)), 5 * rng.normal(size=(2, 6, 4))]  # One layer has larger weights.
  masks = global_masks(ws, 0.5)
  assert sum(int((~m).sum()) for m in masks) == (24 + 48) // 2
  kept = np.concatenate([np.abs(w)[m] for w, m in zip(ws, masks, strict=True)])
  pruned = np.concatenate([np.abs(w)[~m] for w, m in zip(ws, masks, strict=True)])
  assert kept.min() >= pruned.max()
  assert (~masks[0]).mean() > (~masks[1]).mean()  # Not the same fraction per layer.


def test_prune_then_int8_through_rules():
  model = build_model(CFG)
  blocks = model.layers.groups.blocks
  qkv = [(blocks[i].mixer, p) for i in (0, 1) for p in "qkv"]
  before = np.concatenate([np.abs(np.asarray(getattr(m, p).kernel[...])).ravel() for m, p in qkv])
  rules = [
    {"path": r".*/mlp/.*", "method": "wanda", "settings": {"n_m": "2:4"}},
    {"path": r".*/mixer/(q|k|v)", "method": "magnitude_global", "settings": {"sparsity": 0.5}},
    {"path": r".*/mlp/.*", "method": "int8"},
  ]
  plan = make_plan(model, rules)
  calibration = random_calibration(plan)
  result = apply_plan(model, plan, calibration)
  rows = {r["path"]: r for r in result.layers}
  assert rows["layers/groups/blocks/0/mlp/up"]["methods"] == ["wanda", "int8"]
  assert rows["layers/groups/blocks/1/mixer/q"]["methods"] == ["magnitude_global"]
  up = blocks[0].mlp.up
  assert isinstance(up, Int8Linear)
  q = np.asarray(up.w_q[...])  # [layers, K=32, N]: pruned zeros stay zero after quantization
  assert (np.count_nonzero(q.reshape(2, 8, 4, -1), axis=2) <= 2).all()
  after = np.concatenate([np.asarray(getattr(m, p).kernel[...]).ravel() for m, p in qkv])
  keep = after != 0
  assert (~keep).sum() == after.size // 2  # exactly half of all q, k, v weights together
  assert before[keep].min() >= before[~keep].max()  # one threshold across the layers

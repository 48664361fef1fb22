"""AWQ, SmoothQuant W8A8 and LLM.int8 against their definitions and against plain RTN."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reslm.compress import apply_rules, make_plan
from reslm.compress.quantize import formats, matmul, rtn
from reslm.compress.quantize.layers import W8A8Linear
from reslm.compress.registry import METHODS
from reslm.models import build_model
from tests.compress.common import CFG, random_calibration


def outlier_inputs(m=256, k=64, seed=0, scale=30.0, channels=(5, 17, 40)):
  """Activations with a few large, systematic channels (as in LLMs)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(m, k))
  x[:, list(channels)] *= scale
  return jnp.asarray(x, jnp.float32)


def rel_out_error(x, w, y):
  return float(jnp.linalg.norm(y - x @ w) / jnp.linalg.norm(x @ w))


def run(method, w, x, **settings):
  m = METHODS[method]
  r = m.fn(w, x, m.settings(settings, "t"))
  layer = r.cls(r.arrays, in_shape=(w.shape[0],), out_shape=(w.shape[1],), **r.static)
  return layer, r


def test_awq_beats_rtn_with_outlier_channels():
  x = outlier_inputs()
  w = jax.random.normal(jax.random.key(1), (64, 32))
  layer, r = run("awq", w, x, bits=4, group_size=32)
  assert "input_scale" in r.arrays  # 1/s kept in the layer
  awq_err = rel_out_error(x, w, layer.matmul(x))
  rtn_err = rel_out_error(x, w, x @ rtn.quantize_dequantize(w, 4, 32))
  assert awq_err < 0.8 * rtn_err
  # The scaled weights are exactly what is quantized: the effective weight is diag(1/s) Q(diag(s)W).
  np.testing.assert_allclose(layer.matmul(x), x @ layer.dense_weight(), rtol=1e-4, atol=1e-4)


def test_int8_int8_matmul_is_exact_on_integers():
  rng = np.random.default_rng(2)
  x = rng.integers(-127, 128, size=(9, 300)).astype(np.int8)
  w = rng.integers(-127, 128, size=(300, 11)).astype(np.int8)
  acc = matmul.int8_int8_matmul(jnp.asarray(x), jnp.asarray(w))
  assert acc.dtype == jnp.int32
  np.testing.assert_array_equal(acc, x.astype(np.int64) @ w.astype(np.int64))


def test_w8a8_layer_equals_float_on_integer_grid():
  """Integer x and W whose rows / columns reach ±127 have scales of exactly 1: no rounding."""
  rng = np.random.default_rng(3)
  x = rng.integers(-127, 128, size=(6, 48)).astype(np.float32)
  w = rng.integers(-127, 128, size=(48, 10)).astype(np.float32)
  x[:, 0], w[0] = 127.0, -127.0
  layer, r = run("smoothquant", jnp.asarray(w), jnp.asarray(x), smooth=False)
  assert isinstance(layer, W8A8Linear) and r.arrays["w_q"].dtype == jnp.int8
  np.testing.assert_array_equal(layer.matmul(jnp.asarray(x)), x @ w)


def test_smoothing_reduces_w8a8_error_and_keeps_the_function():
  x = outlier_inputs(scale=50.0)
  w = jax.random.normal(jax.random.key(4), (64, 32))
  plain, _ = run("smoothquant", w, x, smooth=False)
  smooth, r = run("smoothquant", w, x, alpha=0.5)
  assert rel_out_error(x, w, smooth.matmul(x)) < 0.5 * rel_out_error(x, w, plain.matmul(x))
  # Migration is exact in float: (x / s) (diag(s) W) = x W.
  s = 1.0 / r.arrays["input_scale"]
  np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-4, atol=1e-3)


def test_llm_int8_outlier_columns_are_exact_in_float():
  x = outlier_inputs(scale=20.0)
  w = jax.random.normal(jax.random.key(5), (64, 32))
  layer, r = run("llm_int8", w, x, threshold=6.0, max_outliers=8, outlier_dtype="float32")
  idx = np.asarray(r.arrays["outlier_idx"])
  assert sorted(idx[idx < 64].tolist()) == [5, 17, 40] and (idx[idx >= 64] == 64).all()
  # Inputs living only in the outlier features go entirely through the float path.
  only = jnp.zeros_like(x).at[:, idx[idx < 64]].set(x[:, idx[idx < 64]])
  np.testing.assert_allclose(layer.matmul(only), only @ w, rtol=1e-5, atol=1e-4)
  # The rest is int8 x int8: the whole product is close, and closer than W8A8 without them.
  w8a8, _ = run("smoothquant", w, x, smooth=False)
  err = rel_out_error(x, w, layer.matmul(x))
  assert err < 0.02 and err < 0.5 * rel_out_error(x, w, w8a8.matmul(x))
  # The int8 part by definition: per-token int8 of the inlier features times the int8 weights.
  inl = x.at[:, idx[idx < 64]].set(0.0)
  xq, xs = formats.quantize_rows_int8(inl)
  ref = (xq.astype(jnp.float32) * xs[:, None]) @ (r.arrays["w_q"] * r.arrays["w_scale"])
  np.testing.assert_allclose(layer.matmul(x), ref + only @ w, rtol=1e-4, atol=1e-3)


def test_llm_int8_cap_keeps_the_largest_and_reports_found_and_kept():
  x = outlier_inputs(scale=20.0)
  x = x.at[:, 17].multiply(3.0)  # Largest outlier features: 17, then 5 or 40.
  w = jax.random.normal(jax.random.key(6), (64, 32))
  amax = np.abs(np.asarray(x)).max(axis=0)
  top2 = sorted(np.argsort(-amax)[:2].tolist())
  _, r = run("llm_int8", w, x, threshold=6.0, max_outliers=2)
  assert r.arrays["outlier_idx"].tolist() == top2
  assert int(r.info["outliers_found"]) == 3 and int(r.info["outliers_kept"]) == 2
  _, r = run("llm_int8", w, x, threshold=6.0)  # No cap (the default): every feature above 6.
  idx = np.asarray(r.arrays["outlier_idx"])
  assert sorted(idx[idx < 64].tolist()) == [5, 17, 40] and int(r.info["outliers_kept"]) == 3
  with pytest.raises(ValueError, match="max_outliers=0 is not allowed for llm_int8"):
    METHODS["llm_int8"].settings({"max_outliers": 0}, "t")


def test_llm_int8_through_rules_sizes_slots_and_warns_when_capped():
  """A stack of two layers with 3 and 1 outlier features: without a cap both keep all (3 float
  slots, the stack's most); capped at 2, the report says 3 found / 2 kept and a warning names
  the layer."""
  rules = [{"path": r".*/blocks/0/mlp/up", "method": "llm_int8"}]
  model = build_model(CFG)
  calibration = random_calibration(make_plan(model, rules), seed=2)
  (name,) = calibration
  calibration[name] *= 0.2  # Inliers: max |x| well below 6.
  calibration[name][0, :, [3, 9, 20]] = 10.0  # Layer 0: three outlier features.
  calibration[name][1, :, 7] = -8.0  # Layer 2: one.
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # No cap, no warning.
    result = apply_rules(model, rules, calibration)
  idx = np.asarray(model.layers.groups.blocks[0].mlp.up.outlier_idx[...])
  assert idx.shape == (2, 3) and idx[0].tolist() == [3, 9, 20] and idx[1].tolist() == [7, 32, 32]
  found = [(s["outliers_found"], s["outliers_kept"]) for s in result.layers[0]["slices"]]
  assert found == [(3, 3), (1, 1)]
  capped = [{**rules[0], "settings": {"max_outliers": 2}}]
  with pytest.warns(UserWarning, match=r"blocks/0/mlp/up\[layer=0\]: llm_int8 found 3 .* keeps 2"):
    result = apply_rules(build_model(CFG), capped, calibration)
  found = [(s["outliers_found"], s["outliers_kept"]) for s in result.layers[0]["slices"]]
  assert found == [(3, 2), (1, 1)]

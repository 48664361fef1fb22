"""Low-rank factoring: exact at full rank, the rank rules as defined, SVD-LLM whitening against
plain SVD on the layer's outputs, and replacement through the rules."""

import jax.numpy as jnp
import numpy as np
import pytest

from reslm.compress import apply_plan, make_plan
from reslm.compress.lowrank import (
  LowRankLinear,
  LowRankSparseLinear,
  choose_rank,
  factors,
  svd_parts,
)
from reslm.compress.registry import METHODS
from reslm.models import build_model
from reslm.models.linear import Linear
from tests.compress.common import CFG, random_calibration


def settings(name="svd", **given):
  return METHODS[name].settings(given, "t")


def anisotropic(k=24, n=16, m=256, seed=0):
  """Inputs with feature scales spread over 3 decades, correlated; Gaussian weights."""
  rng = np.random.default_rng(seed)
  scales = np.logspace(0, 3, k)
  mix = np.linalg.qr(rng.normal(size=(k, k)))[0]
  x = (rng.normal(size=(m, k)) * scales) @ mix
  return rng.normal(size=(k, n)), x


def out_error(x, w, w_hat):
  return np.linalg.norm(x @ (w - w_hat)) / np.linalg.norm(x @ w)


@pytest.mark.parametrize("aware", [False, True])
def test_full_rank_is_exact(aware):
  w, x = anisotropic()
  a, b = factors(svd_parts(w, x if aware else None), 16)
  assert a.shape == (24, 16) and b.shape == (16, 16)
  np.testing.assert_allclose(a @ b, w, rtol=1e-9, atol=1e-9)


def test_rank_rules():
  sigma = np.array([4.0, 2.0, 1.0, 1.0])  # σ² = 16, 4, 1, 1 (total 22)
  assert choose_rank(sigma, 16, 8, settings()) == 2  # default energy 0.9: 16 < 19.8 <= 20
  assert choose_rank(sigma, 16, 8, settings(energy=0.7)) == 1  # 16 / 22 = 0.727
  assert choose_rank(sigma, 16, 8, settings(energy=0.95)) == 3  # 21 / 22 = 0.955
  assert choose_rank(sigma, 16, 8, settings(energy=1.0)) == 4
  # Budget: r (16 + 8) <= 0.5 · 128 -> r = 2; a fixed rank is capped at min(K, N).
  assert choose_rank(sigma, 16, 8, settings(param_fraction=0.5)) == 2
  assert choose_rank(sigma, 16, 8, settings(rank=50)) == 8
  # On a matrix built with that spectrum, the truncated SVD keeps exactly the named energy.
  rng = np.random.default_rng(0)
  u = np.linalg.qr(rng.normal(size=(16, 4)))[0]
  v = np.linalg.qr(rng.normal(size=(8, 4)))[0]
  w = (u * sigma) @ v.T
  a, b = factors(svd_parts(w), 2)
  np.testing.assert_allclose(np.linalg.norm(w - a @ b) ** 2, 2.0, rtol=1e-9)
  with pytest.raises(ValueError, match="give one rank rule"):
    settings(energy=0.9, rank=3)


def test_svd_llm_whitening_beats_plain_svd():
  w, x = anisotropic()
  for rank in (4, 8):
    plain = out_error(x, w, np.matmul(*factors(svd_parts(w), rank)))
    aware = out_error(x, w, np.matmul(*factors(svd_parts(w, x, damp=1e-6), rank)))
    assert aware < 0.7 * plain


def test_rules_replace_with_low_rank_layers():
  model = build_model(CFG)
  tokens = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)
  blocks = model.layers.groups.blocks
  w0 = np.asarray(blocks[0].mlp.up.kernel[...])  # [layers, 32, 85]
  w_down = np.asarray(blocks[0].mlp.down.kernel[...])  # [layers, 85, 32]
  rules = [
    {"path": r".*/blocks/0/mlp/up", "method": "svd", "settings": {"rank": 4}},
    {"path": r".*/blocks/1/mlp/down", "method": "svd_llm", "settings": {"param_fraction": 0.25}},
    {"path": r".*/blocks/0/mlp/down", "method": "losparse", "settings": {"rank": 2}},
    {"path": r".*/blocks/1/mlp/up", "method": "svd", "settings": {"energy": 1.0}},
  ]
  plan = make_plan(model, rules)
  calibration = random_calibration(plan)
  result = apply_plan(model, plan, calibration)
  up, down = model.layers.groups.blocks[0].mlp.up, model.layers.groups.blocks[1].mlp.down
  assert isinstance(up, LowRankLinear) and isinstance(down, LowRankLinear)
  assert up.a.shape == (2, 32, 4) and up.b.shape == (2, 4, 85)
  assert down.a.shape == (2, 85, 5)  # floor(0.25 · 85 · 32 / 117) = 5
  assert up.a.get_metadata()["out_sharding"] == ("layers", "embed", None)
  assert isinstance(blocks[1].mlp.up, Linear)  # full rank would not shrink it: left dense
  assert len(result.manifest) == 3
  # LoSparse: round(0.05 · 85) = 4 residual entries per output, the largest of W − ab.
  sparse = blocks[0].mlp.down
  assert isinstance(sparse, LowRankSparseLinear) and sparse.rows.shape == (2, 4, 32)
  for i in range(2):
    a, b = factors(svd_parts(w_down[i]), 2)
    rest = np.sort(np.abs(w_down[i] - a @ b), axis=0)[:-4]  # what the residual leaves out
    arrays = {k: getattr(sparse, k)[...][i] for k in ("a", "b", "values", "rows")}
    w_hat = np.asarray(LowRankSparseLinear.weight(arrays, {}, 85))
    np.testing.assert_allclose(np.linalg.norm(w_down[i] - w_hat), np.linalg.norm(rest), rtol=1e-4)
  for i in range(2):  # Each stacked layer: its own best rank-4 approximation.
    s = np.linalg.svd(w0[i], compute_uv=False)
    a, b = np.asarray(up.a[...][i]), np.asarray(up.b[...][i])
    np.testing.assert_allclose(
      np.linalg.norm(w0[i] - a @ b), np.sqrt(np.sum(s[4:] ** 2)), rtol=1e-4
    )
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 32)), jnp.float32)
  one = {k: getattr(sparse, k)[...][1] for k in ("a", "b", "values", "rows")}
  layer = LowRankSparseLinear(one, in_shape=(85,), out_shape=(32,))
  x85 = jnp.asarray(np.random.default_rng(2).normal(size=(3, 85)), jnp.float32)
  np.testing.assert_allclose(layer(x85), x85 @ layer.dense_weight(), rtol=1e-5, atol=1e-5)
  single = LowRankLinear({"a": up.a[...][0], "b": up.b[...][0]}, in_shape=(32,), out_shape=(85,))
  np.testing.assert_allclose(single(x), x @ single.dense_weight(), rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(model(jnp.asarray(tokens)).logits)).all()

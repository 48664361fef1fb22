"""ASVD: the scaled SVD against its definition in numpy, the rank search against a brute-force
threshold scan, and the method through the rules on a model with a constructed insensitive block
(its sensitivities checked against a direct loss computation)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from reslm.compress import apply_plan, make_plan
from reslm.compress.asvd import allocate, candidates, scaled_svd_parts, scaling, unit_params
from reslm.compress.lowrank import LowRankLinear, budget_rank, factors, svd_parts
from reslm.compress.registry import METHODS, ModelData
from reslm.models import build_model
from reslm.models.linear import Linear
from tests.compress.common import CFG, random_calibration


def spread_inputs(k=32, n=20, m=512, seed=0):
  """Independent input features with scales over two decades, and Gaussian weights."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(m, k)) * np.logspace(0, 2, k)[rng.permutation(k)]
  return rng.normal(size=(k, n)), x


def out_error(x, w, w_hat):
  return np.linalg.norm(x @ (w - w_hat)) / np.linalg.norm(x @ w)


def test_factors_are_the_truncated_svd_of_the_scaled_weight():
  w, x = spread_inputs()
  s = np.abs(x).mean(axis=0) ** 0.5 + 1e-6  # S_kk = mean|x_k|^α + 1e-6, α = 0.5
  u, sigma, vt = np.linalg.svd(s[:, None] * w, full_matrices=False)
  np.testing.assert_allclose(scaling(x, 0.5), s, rtol=1e-12)
  for rank in (3, 8):
    a, b = factors(scaled_svd_parts(w, scaling(x, 0.5)), rank)
    assert a.shape == (32, rank) and b.shape == (rank, 20)
    want = (u[:, :rank] * sigma[:rank]) @ vt[:rank] / s[:, None]  # S⁻¹ U_r Σ_r V_rᵀ
    np.testing.assert_allclose(a @ b, want, rtol=1e-9, atol=1e-9)
    # The best rank-r approximation in the S-weighted norm: it leaves Σ_{i>r} σ_i².
    np.testing.assert_allclose(
      np.linalg.norm(s[:, None] * (w - a @ b)) ** 2, np.sum(sigma[rank:] ** 2), rtol=1e-9
    )
    # Σ split evenly: S a and bᵀ both have column norms σ^½.
    np.testing.assert_allclose(np.linalg.norm(s[:, None] * a, axis=0), sigma[:rank] ** 0.5)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), sigma[:rank] ** 0.5)
    # On inputs of spread scales: better outputs than plain SVD, not better than whitening.
    plain = out_error(x, w, np.matmul(*factors(svd_parts(w), rank)))
    whitened = out_error(x, w, np.matmul(*factors(svd_parts(w, x, damp=1e-6), rank)))
    assert whitened <= out_error(x, w, a @ b) < 0.8 * plain


def brute_force(losses, shapes, fraction):
  """The allocation of the smallest loss threshold within the budget, by scanning every one."""
  budget = fraction * sum(unit_params(s, 1.0) for s in shapes.values())
  for tau in [-np.inf, *sorted({v for row in losses.values() for v in row.values()})]:
    ratios = {
      u: min([r for r, v in row.items() if v <= tau], default=1.0) for u, row in losses.items()
    }
    if sum(unit_params(shapes[u], r) for u, r in ratios.items()) <= budget:
      return ratios
  return None


def test_rank_search_meets_the_budget_and_truncates_insensitive_units_first():
  shapes = {"sensitive": (1, 64, 64), "insensitive": (1, 64, 64), "middle": (2, 32, 96)}
  losses = {  # Calibration loss with only that unit truncated at ratio 0.25 / 0.5 / 0.75.
    "sensitive": {0.25: 5.0, 0.5: 3.0, 0.75: 2.2},
    "insensitive": {0.25: 2.05, 0.5: 2.02, 0.75: 2.01},
    "middle": {0.25: 2.6, 0.5: 2.3, 0.75: 2.1},
  }
  dense = sum(unit_params(s, 1.0) for s in shapes.values())
  seen = []
  for fraction in (0.3, 0.5, 0.7, 0.9, 1.0):
    got = allocate(losses, shapes, fraction)
    assert got == brute_force(losses, shapes, fraction)
    assert sum(unit_params(shapes[u], r) for u, r in got.items()) <= fraction * dense
    assert got["insensitive"] <= got["middle"] <= got["sensitive"]
    seen.append(got)
  # Half of 14336: insensitive at 0.25 (rank 8: 1024) + sensitive at 0.75 (rank 24: 3072) +
  # middle at 0.5 (rank 12: 2 · 1536) = 7168 exactly; admitting no pair less leaves 8704.
  assert seen[1] == {"sensitive": 0.75, "insensitive": 0.25, "middle": 0.5}
  assert seen[-1] == dict.fromkeys(shapes, 1.0)  # The whole budget: nothing truncated.
  with pytest.raises(ValueError, match="asvd param_fraction=0.1 is below"):
    allocate(losses, shapes, 0.1)
  assert candidates(0.1) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
  assert candidates(0.25) == [0.25, 0.5, 0.75]


def direct_loss(model, tokens):
  logits = model(jnp.asarray(tokens[:, :-1])).logits.astype(jnp.float32)
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean())


def own_samples(model, rows: int, length: int, seed: int = 0) -> np.ndarray:
  """Sequences sampled from the model itself (T = 1): on them any change of the model raises the
  expected loss (Gibbs), so a truncation's loss increase measures how much the unit matters."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)
  rng = np.random.default_rng(seed)
  tokens = np.zeros((rows, length), np.int32)
  tokens[:, 0] = rng.integers(0, CFG.vocab_size, rows)
  for t in range(length - 1):  # Causal: the later (still zero) tokens do not change logits[:, t].
    logits = np.asarray(forward(state, tokens), np.float64)[:, t]
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    tokens[:, t + 1] = [rng.choice(CFG.vocab_size, p=row / row.sum()) for row in p]
  return tokens


def test_asvd_through_rules_truncates_the_insensitive_block():
  """blocks/1's MLP output is scaled down 1000x, blocks/0's up 100x (and the head 10x, so the
  model is far from uniform): on the model's own samples, truncating blocks/1 leaves the loss as
  it is (blocks/0 raises it by 0.2-0.6 nats), so the search gives blocks/1's three projections
  the smallest ratio and keeps blocks/0 as dense as the budget allows."""
  model = build_model(CFG)
  blocks = model.layers.groups.blocks
  blocks[1].mlp.down.kernel[...] *= 1e-3
  blocks[0].mlp.down.kernel[...] *= 100.0
  model.lm_head.kernel[...] *= 10.0
  graphdef, state = nnx.split(model)
  original = nnx.to_pure_dict(state)
  tokens = own_samples(model, 16, 33)
  rules = [
    {
      "path": r".*/mlp/.*",
      "method": "asvd",
      "settings": {"param_fraction": 0.6, "ratio_step": 0.25},
    }
  ]
  plan = make_plan(model, rules)
  calibration = random_calibration(plan)
  result = apply_plan(model, plan, calibration, ModelData(tokens, batch_size=8))
  info = result.manifest[-1]["info"]
  name = "layers/groups/blocks/{}/mlp/{}".format
  ratios = info["ratios"]
  assert [ratios[name(1, p)] for p in ("gate", "up", "down")] == [0.25] * 3
  assert min(ratios[name(0, p)] for p in ("gate", "up", "down")) > 0.25
  assert info["params"]["after"] <= 0.6 * info["params"]["dense"]
  # One sensitivity entry by hand: blocks/0 up truncated to ratio 0.5, the rest as it was.
  check = nnx.merge(graphdef, original)
  up = check.layers.groups.blocks[0].mlp.up
  x = calibration[name(0, "up")]
  w = np.asarray(up.kernel[...], np.float64)  # [2, 32, 85]
  rank = budget_rank(0.5, 32, 85)
  s = np.abs(x).mean(axis=1) ** 0.5 + 1e-6  # [2, 32]
  approx = []
  for i in range(2):
    u, sigma, vt = np.linalg.svd(s[i][:, None] * w[i], full_matrices=False)
    approx.append((u[:, :rank] * sigma[:rank]) @ vt[:rank] / s[i][:, None])
  up.kernel[...] = jnp.asarray(np.stack(approx), jnp.float32)
  np.testing.assert_allclose(
    info["sensitivity"][name(0, "up")]["0.5"], direct_loss(check, tokens), rtol=1e-5
  )
  # The installed layers: ASVD factors at the allocated ranks; dense units left as they were.
  for i in (0, 1):
    for p in ("gate", "up", "down"):
      layer, ratio = getattr(blocks[i].mlp, p), ratios[name(i, p)]
      if ratio == 1.0:
        assert isinstance(layer, Linear)
        continue
      assert isinstance(layer, LowRankLinear)
      k, n = (32, 85) if p != "down" else (85, 32)
      assert layer.a.shape == (2, k, budget_rank(ratio, k, n)) == (2, k, info["ranks"][name(i, p)])
  np.testing.assert_allclose(
    info["calibration_loss"]["after"], direct_loss(model, tokens), rtol=1e-5
  )


def test_uniform_allocation_and_settings():
  model = build_model(CFG)
  tokens = np.random.default_rng(0).integers(0, 64, (4, 9)).astype(np.int32)
  rules = [
    {
      "path": r".*/blocks/0/mlp/up",
      "method": "asvd",
      "settings": {"search": False, "param_fraction": 0.5},
    }
  ]
  plan = make_plan(model, rules)
  result = apply_plan(model, plan, random_calibration(plan), ModelData(tokens, batch_size=4))
  assert result.manifest[-1]["info"]["ratios"] == {"layers/groups/blocks/0/mlp/up": 0.5}
  assert model.layers.groups.blocks[0].mlp.up.a.shape == (2, 32, budget_rank(0.5, 32, 85))
  with pytest.raises(ValueError, match=r"param_fraction=0.05 is below ratio_step=0.1"):
    METHODS["asvd"].settings({"param_fraction": 0.05}, "t")
  with pytest.raises(ValueError, match="alpha=1.5 is not allowed for asvd"):
    METHODS["asvd"].settings({"alpha": 1.5}, "t")

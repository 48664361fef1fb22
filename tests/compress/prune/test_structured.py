"""Structured pruning: smaller shapes that compute the masked original, lowest-scored units
removed (Taylor score against a direct |w · dL/dw| computation), GQA, checkpoint round trip,
composition with later stages, recovery fine-tune and one-line errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs.compress import structured as structured_configs
from reslm.compress import (
  apply_plan,
  capture_inputs,
  load_compressed,
  make_plan,
  save_compressed,
  unfused_projections,
)
from reslm.compress.prune import structured
from reslm.compress.registry import ModelData
from reslm.compress.targets import find_targets
from reslm.models import build_model
from tests.compress.common import CFG

BOTH = r".*/(mixer|mlp)/.*"  # the mixers and MLPs, selected through their projections
ATOL = 1e-5  # float32, logits of a 4-layer width-32 model


@functools.cache
def _built(cfg):
  return build_model(cfg)


def new_model(cfg=CFG):
  """A fresh copy of the seed-0 model of `cfg` (built once per config)."""
  return nnx.clone(_built(cfg))


def tokens(n=8, t=16, seed=0):
  return np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, t)).astype(np.int32)


def prune(model, data=None, path=BOTH, calibration=None, extra=(), order=None, **settings):
  rules = [{"path": path, "method": "structured", "settings": settings}, *extra]
  plan = make_plan(model, rules, **({} if order is None else {"order": order}))
  result = apply_plan(model, plan, calibration, data or ModelData(tokens(), 4))
  (info,) = [e["info"] for e in result.manifest if "info" in e]
  return info, result


def num_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def removed_by_slice(model, info):
  """Site name -> {stacked slice index: removed units}, from the info's model-layer keys."""
  layers = {t.name: t.layers for t in find_targets(model) if t.kind == "attention"}
  layers |= {t.name.rsplit("/", 1)[0]: t.layers for t in find_targets(model) if "/mlp/" in t.name}
  return {
    site: {layers[site].index(int(layer)): units for layer, units in per_layer.items()}
    for site, per_layer in info["removed"].items()
  }


def masked(model, removed, ratio):
  """The original model with removed heads' outputs (rows of o) and neurons (rows of down) zeroed."""
  state = nnx.to_pure_dict(nnx.state(model))
  for site, per_slice in removed.items():
    tree = state
    for key in site.split("/"):
      tree = tree[int(key) if key.isdigit() else key]
    for s, units in per_slice.items():
      if site.endswith("mixer"):
        heads = [g * ratio + j for g in units for j in range(ratio)]
        tree["o"]["kernel"] = tree["o"]["kernel"].at[s, heads].set(0.0)
      else:
        tree["down"]["kernel"] = tree["down"]["kernel"].at[s, units].set(0.0)
  graphdef, _ = nnx.split(model)
  return nnx.merge(graphdef, state)


GQA = dataclasses.replace(CFG, num_kv_heads=2)  # two query heads per KV group
# Cases share configs and settings with the tests below, so they share compilations.
CASES = {
  "gqa_taylor": (GQA, dict(heads=0.5, neurons=0.25, criterion="taylor")),
  "mha_magnitude": (CFG, dict(heads=0.25, neurons=0.25, criterion="magnitude")),
  "gelu_bias_unscanned": (
    dataclasses.replace(CFG, mlp="gelu", mlp_dim=48, scan_layers=False),
    dict(neurons=0.25, criterion="magnitude"),
  ),
}


@pytest.mark.parametrize("case", CASES)
def test_pruned_model_is_smaller_and_equals_the_masked_original(case):
  cfg, settings = CASES[case]
  model = new_model(cfg)
  original = nnx.clone(model)
  x = tokens(4, 12, seed=1)
  info, _ = prune(model, **settings)

  ratio = cfg.num_heads // cfg.num_kv_heads
  groups = round(settings.get("heads", 0) * cfg.num_kv_heads)
  neurons = round(settings.get("neurons", 0) * cfg.mlp_dim)
  new = model.cfg
  assert (new.num_kv_heads, new.num_heads) == (cfg.num_kv_heads - groups, new.num_kv_heads * ratio)
  assert (new.mlp_dim, new.resolved_head_dim) == (cfg.mlp_dim - neurons, cfg.resolved_head_dim)
  mixer = model.layers.groups.blocks[0].mixer
  assert mixer.q.kernel.shape == (2, 32, new.num_heads, 8) and mixer.num_heads == new.num_heads
  assert model.layers.groups.blocks[1].mlp.down.kernel.shape == (2, new.mlp_dim, 32)
  e, d = cfg.d_model, cfg.resolved_head_dim
  per_group = 2 * ratio * e * d + 2 * e * d  # q and o columns/rows of its heads, k and v
  per_neuron = 3 * e if cfg.mlp == "swiglu" else 2 * e + 1  # gate/up/down (or up + bias, down)
  saved = cfg.num_layers * (groups * per_group + neurons * per_neuron)
  assert num_params(original) - num_params(model) == saved

  # Every layer removed the counted units, and removing them = zeroing their outputs.
  removed = removed_by_slice(original, info)
  assert all(
    len(u) == groups for s, p in removed.items() if s.endswith("mixer") for u in p.values()
  )
  assert all(len(u) == neurons for s, p in removed.items() if s.endswith("mlp") for u in p.values())
  expected = masked(original, removed, ratio)(x).logits
  np.testing.assert_allclose(model(x).logits, expected, atol=ATOL, rtol=ATOL)
  assert float(jnp.max(jnp.abs(original(x).logits - expected))) > 100 * ATOL  # pruning did act


def direct_taylor(model, x, ratio):
  """|w · dL/dw| summed per unit by explicit loops: {site: [slices, units]}."""
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)

  def loss(p):
    logits = nnx.merge(graphdef, p)(x[:, :-1]).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

  grads = jax.jit(jax.grad(loss))(params)
  out = {}
  for i in range(2):
    w, g = (t["layers"]["groups"]["blocks"][i] for t in (params, grads))
    prod = {
      (m, p): np.abs(np.asarray(w[m][p]["kernel"]) * np.asarray(g[m][p]["kernel"]))
      for m, ps in (("mixer", "qkvo"), ("mlp", ("gate", "up", "down")))
      for p in ps
    }
    heads = np.zeros((2, model.cfg.num_kv_heads))
    neurons = np.zeros((2, model.cfg.mlp_dim))
    for s in range(2):
      for grp in range(heads.shape[1]):
        hs = slice(grp * ratio, (grp + 1) * ratio)
        heads[s, grp] = (
          prod["mixer", "q"][s, :, hs].sum()
          + prod["mixer", "k"][s, :, grp].sum()
          + prod["mixer", "v"][s, :, grp].sum()
          + prod["mixer", "o"][s, hs].sum()
        )
      for n in range(neurons.shape[1]):
        neurons[s, n] = sum(prod["mlp", p][s, :, n].sum() for p in ("gate", "up"))
        neurons[s, n] += prod["mlp", "down"][s, n].sum()
    out[f"layers/groups/blocks/{i}/mixer"] = heads
    out[f"layers/groups/blocks/{i}/mlp"] = neurons
  return out


def test_taylor_scores_match_direct_computation_and_lowest_units_are_removed():
  model = new_model(GQA)
  x = tokens(6)
  data = ModelData(x, 4)  # Two batches, the last padded: the mean over all six sequences.
  direct = direct_taylor(model, x, ratio=2)
  sites = structured.find_sites(model, find_targets(model), {"heads": 0.5, "neurons": 0.25})
  scores, loss = structured.unit_scores(model, sites, "taylor", data)
  assert loss > 0
  for name, ref in direct.items():
    np.testing.assert_allclose(scores[name], ref, rtol=1e-4, atol=1e-10)
  # Magnitude: the L2 norm of the same slices.
  magnitude, _ = structured.unit_scores(model, sites, "magnitude")
  mixer = nnx.to_pure_dict(nnx.state(model))["layers"]["groups"]["blocks"][0]["mixer"]
  q, k, v, o = (np.asarray(mixer[p]["kernel"]) for p in "qkvo")
  norm = np.sqrt((q[1, :, 2:4] ** 2).sum() + (k[1, :, 1] ** 2).sum() + (v[1, :, 1] ** 2).sum())
  norm = np.sqrt(norm**2 + (o[1, 2:4] ** 2).sum())
  np.testing.assert_allclose(magnitude["layers/groups/blocks/0/mixer"][1, 1], norm, rtol=1e-6)

  original = nnx.clone(model)
  info, _ = prune(model, data=data, heads=0.5, neurons=0.25)
  count = round(0.25 * CFG.mlp_dim)
  for site, per_slice in removed_by_slice(original, info).items():
    for s, units in per_slice.items():
      lowest = np.argsort(direct[site][s], kind="stable")[: 1 if site.endswith("mixer") else count]
      assert sorted(units) == sorted(lowest.tolist()), (site, s)


def test_checkpoint_round_trip_and_later_stages_see_the_shrunk_layers(tmp_path):
  model = new_model(CFG)
  original = nnx.clone(model)
  x = tokens()
  targets = [t for t in find_targets(model) if t.name.endswith(("mixer/o", "mlp/down"))]
  calibration = capture_inputs(model, targets, x, batch_size=4)
  before = dict(calibration)
  int8 = [{"path": r".*/mlp/(gate|up)", "method": "int8"}]  # quantize stage, after pruning
  info, result = prune(model, calibration=calibration, extra=int8, heads=0.25, neurons=0.25)
  up = model.layers.groups.blocks[0].mlp.up
  assert type(up).__name__ == "Int8Linear" and up.out_shape == (model.cfg.mlp_dim,)

  # Captured inputs of o and down keep the kept units' features. Layer 0's attention input does
  # not depend on pruning, so its o inputs are the pruned model's own.
  removed = removed_by_slice(original, info)
  fresh = capture_inputs(model, [t for t in find_targets(model) if t.name == targets[0].name], x)
  np.testing.assert_allclose(calibration[targets[0].name][0], fresh[targets[0].name][0], atol=1e-6)
  down = "layers/groups/blocks/1/mlp/down"
  for s in range(2):
    kept = sorted(set(range(CFG.mlp_dim)) - set(removed[down.rsplit("/", 1)[0]][s]))
    np.testing.assert_array_equal(calibration[down][s], before[down][s][:, kept])

  meta = {"model": model.cfg.to_dict(), "compress": {"manifest": result.manifest}}
  save_compressed(str(tmp_path), model, meta, step=1)
  reloaded, meta = load_compressed(str(tmp_path))
  assert reloaded.cfg == model.cfg and meta["compress"]["manifest"][0]["info"] == info
  with unfused_projections():
    np.testing.assert_array_equal(reloaded(x).logits, model(x).logits)
  assert num_params(reloaded) < num_params(original)


def test_recovery_fine_tune_lowers_the_calibration_loss():
  def batch(step, n=8, t=17):  # A learnable language: a fixed cycle from a random start.
    start = np.random.default_rng(step).integers(0, 16, (n, 1))
    seq = ((start + np.arange(t)) * 5 % 16).astype(np.int32)
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": np.ones((n, t - 1))}

  calib = np.concatenate([batch(1000 + i)["inputs"] for i in range(2)])
  model = new_model(CFG)
  data = ModelData(calib, 4, batch)
  info, _ = prune(model, data=data, heads=0.25, neurons=0.25, recover_steps=30, recover_lr=3e-3)
  losses = info["calibration_loss"]  # before pruning, pruned, pruned and fine-tuned
  assert losses["recovered"] < 0.8 * losses["pruned"]
  direct, _ = structured.next_token_loss(model, calib, 16)
  assert direct == pytest.approx(losses["recovered"], rel=1e-5)
  assert model.cfg.num_heads == 3 and info["recovery"]["steps"] == 30


BAD = [
  (CFG, BOTH, dict(heads=1.0), "heads=1.0 is not allowed for structured: a number in [0, 1)"),
  (CFG, BOTH, dict(neurons=-0.1), "neurons=-0.1 is not allowed"),
  (CFG, BOTH, dict(), "removes nothing: set heads and/or neurons"),
  (CFG, BOTH, dict(heads=0.5, criterion="fisher"), "criterion='fisher' is not allowed"),
  (CFG, BOTH, dict(heads=0.5, recover_steps=-1), "recover_steps=-1 is not allowed"),
  (
    GQA,
    BOTH,
    dict(heads=0.25),
    "heads=0.25 removes 0.5 of model.num_kv_heads=2 KV groups (2 query heads each)",
  ),
  (CFG, r".*/0/mixer", dict(heads=0.5), "does not select layers/groups/blocks/1/mixer"),
  (CFG, BOTH, dict(neurons=0.001), "removes 0 of model.mlp_dim=85 neurons"),
  (CFG, r".*/0/mlp/down", dict(neurons=0.5), "does not select layers/groups/blocks/1/mlp"),
]


@pytest.mark.parametrize("cfg,path,settings,message", BAD)
def test_bad_settings_give_one_line_errors(cfg, path, settings, message):
  model = new_model(cfg)
  with pytest.raises(ValueError) as err:
    prune(model, path=path, **settings)
  assert message in str(err.value) and "\n" not in str(err.value)


def test_quantized_projections_are_an_error():
  int8 = [{"path": r".*/mixer/q", "method": "int8"}]
  with pytest.raises(ValueError, match=r"needs float projections; .*/mixer/q is a Int8Linear"):
    prune(new_model(CFG), extra=int8, order=("quantize", "prune"), heads=0.5)


def test_recovery_without_training_batches_is_an_error():
  with pytest.raises(ValueError, match="needs the run's training batches"):
    prune(new_model(CFG), heads=0.5, recover_steps=2)


@pytest.mark.parametrize("variant", structured_configs.VARIANTS)
def test_config_variants_validate(variant):
  from reslm.compress.pipeline import validate_config

  validate_config(structured_configs.get_config(variant))

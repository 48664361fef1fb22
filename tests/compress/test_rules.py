"""Rules select exactly the modules they name, compose by stage, and fail in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reslm.compress import apply_plan, apply_rules, make_plan, registry, unfused_projections
from reslm.compress.quantize import Int4Linear, Int8Linear, NF4Linear
from reslm.compress.registry import Dense
from reslm.compress.targets import find_targets, get_module
from reslm.models import build_model
from reslm.models.linear import Linear
from tests.compress.common import CFG

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)


@pytest.fixture
def model():
  return build_model(CFG)


@pytest.fixture
def threshold_method():
  """A stand-in pruning method (zero every |w| < t), registered for one test."""

  @registry.register(
    "test_threshold", stage="prune", defaults={"t": 0.02}, checks={"t": registry.number(0, 1)}
  )
  def fn(w_kn, x_mk, settings):
    del x_mk
    return Dense(jnp.where(jnp.abs(w_kn) < settings["t"], 0.0, w_kn))

  yield "test_threshold"
  registry.METHODS.pop("test_threshold")


def chosen(plan, stage="quantize"):
  return {(t.name, r.method.name) for t, r in plan.layer_steps[stage]}


def test_paths_name_stacked_layers(model):
  targets = {t.name: t for t in find_targets(model)}
  assert targets["layers/groups/blocks/0/mlp/up"].layers == (0, 2)
  assert targets["layers/groups/blocks/1/mixer/o"].layers == (1, 3)
  assert targets["layers/groups/blocks/1/mixer"].kind == "attention"
  assert targets["lm_head"].layers == () and targets["lm_head"].lead == ()
  assert "embed" not in targets  # embeddings are not projections


def test_rules_select_exactly_the_intended_modules(model):
  rules = [
    {"path": r".*/blocks/1/mlp/down", "method": "none"},
    {"path": r".*/mlp/.*", "method": "int4", "settings": {"group_size": 32}},
    {"path": r".*/mixer/(q|k|v|o)", "method": "int8"},
    {"path": r".*", "method": "nf4", "settings": {"block_size": 32}},  # first match wins
    {"path": r".*/mixer", "method": "kv_int8"},
  ]
  plan = make_plan(model, rules)
  b = "layers/groups/blocks"
  expected = {(f"{b}/{i}/mlp/{p}", "int4") for i in (0, 1) for p in ("gate", "up")}
  expected |= {(f"{b}/0/mlp/down", "int4"), ("lm_head", "nf4")}
  expected |= {(f"{b}/{i}/mixer/{p}", "int8") for i in (0, 1) for p in "qkvo"}
  assert chosen(plan) == expected
  [(rule, targets)] = plan.model_steps["quantize"]
  assert rule.method.name == "kv_int8"
  assert [t.name for t in targets] == [f"{b}/0/mixer", f"{b}/1/mixer"]
  assert plan.calibration_targets() == []

  apply_plan(model, plan)
  assert isinstance(get_module(model, ("layers", "groups", "blocks", 1, "mlp", "down")), Linear)
  up = get_module(model, ("layers", "groups", "blocks", 0, "mlp", "up"))
  assert isinstance(up, Int4Linear) and up.w_packed.shape == (2, 16, 85)  # [layers, K/2, N]
  assert up.w_packed.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
  assert isinstance(get_module(model, ("layers", "groups", "blocks", 1, "mixer", "o")), Int8Linear)
  assert isinstance(model.lm_head, NF4Linear) and model.lm_head.lead == ()
  assert model.layers.groups.blocks[0].mixer.kv_cache_quant == "int8"


def test_compressed_layers_compute_their_dequantized_weights(model):
  """Per stacked layer, both call paths (fused via `kernel`, unfused via `matmul`) equal a float
  model holding the dequantized weights."""
  rules = [
    {"path": r".*/mlp/(gate|up)", "method": "int4", "settings": {"group_size": 32}},
    {"path": r".*/mlp/down", "method": "nf4", "settings": {"block_size": 32}},
    {"path": r".*", "method": "int8"},
  ]
  float_model = build_model(CFG)
  result = apply_rules(model, rules)
  for entry in result.manifest:
    path = tuple(entry["path"])
    q = get_module(model, path)
    g, s = nnx.split(q)
    dense = jax.vmap(lambda st, g=g: nnx.merge(g, st).dense_weight())  # [layers, K, N]
    w = dense(s) if q.lead else q.dense_weight()
    kernel = get_module(float_model, path).kernel
    kernel[...] = w.reshape(kernel.shape)
  ref = float_model(TOKENS).logits
  np.testing.assert_allclose(model(TOKENS).logits, ref, rtol=1e-5, atol=1e-5)
  with unfused_projections():
    np.testing.assert_allclose(model(TOKENS).logits, ref, rtol=1e-4, atol=1e-5)


def test_stages_compose_in_declared_order(model, threshold_method):
  up = ("layers", "groups", "blocks", 0, "mlp", "up")
  w0 = get_module(model, up).kernel[...]
  rules = [
    {"path": r".*/mlp/up", "method": "int8"},
    {"path": r"lm_head", "method": "none", "settings": {"stage": "prune"}},
    {"path": r".*", "method": threshold_method, "settings": {"t": 0.02}},
  ]
  plan = make_plan(model, rules)
  assert ("lm_head", threshold_method) not in chosen(plan, "prune")
  assert len(chosen(plan, "prune")) == len([t for t in plan.targets if t.kind == "linear"]) - 1
  head = model.lm_head.kernel[...]
  apply_plan(model, plan)
  # prune -> quantize: the int8 codes are those of the pruned weights.
  pruned = jnp.where(jnp.abs(w0) < 0.02, 0.0, w0)
  q = get_module(model, up)
  for i in range(2):
    w_q = jnp.clip(jnp.round(pruned[i] / q.scales[...][i]), -127, 127)
    np.testing.assert_array_equal(q.w_q[...][i], w_q)
  np.testing.assert_array_equal(model.lm_head.kernel[...], head)  # shielded
  down = model.layers.groups.blocks[0].mlp.down.kernel[...]
  assert float(jnp.min(jnp.where(down == 0, 1.0, jnp.abs(down)))) >= 0.02

  with pytest.raises(ValueError, match="cannot follow"):
    apply_rules(build_model(CFG), rules, order=("quantize", "prune"))


def test_model_level_method_gets_the_selected_targets(model):
  seen = []

  @registry.register("test_model_level", stage="prune", target="linear", per_layer=False)
  def fn(m, targets, calibration, settings):
    del m, calibration, settings
    seen.extend(t.name for t in targets)
    return [{"path": ["lm_head"], "attribute": "tag", "value": 1}]

  try:
    rules = [{"path": r".*/blocks/1/mlp/.*|lm_head", "method": "test_model_level"}]
    result = apply_rules(model, rules)
  finally:
    registry.METHODS.pop("test_model_level")
  b = "layers/groups/blocks/1/mlp"
  assert sorted(seen) == sorted([f"{b}/down", f"{b}/gate", f"{b}/up", "lm_head"])
  assert result.manifest == [{"path": ["lm_head"], "attribute": "tag", "value": 1}]


@pytest.mark.parametrize(
  "rules,message",
  [
    ([{"path": "nothing/here", "method": "int8"}], r"rules\[0\].path='nothing/here' matches no"),
    ([{"path": ".*", "method": "int3"}], r"rules\[0\].method='int3' is not a known"),
    ([{"path": ".*", "method": "int4", "settings": {"group": 3}}], "group is not a setting"),
    ([{"path": ".*", "method": "int4", "settings": {"group_size": 48}}], "48 is not allowed"),
    ([{"path": "(", "method": "int8"}], "not a valid regular expression"),
    ([{"path": r".*/mlp/up", "method": "kv_int8"}], "matches no attention module"),
    ([{"path": ".*", "method": "int8", "bits": 8}], "has keys"),
    ("int8", "must be a list"),
  ],
)
def test_rule_errors_are_one_line(model, rules, message):
  with pytest.raises(ValueError, match=message) as e:
    make_plan(model, rules)
  assert "\n" not in str(e.value)


def test_unknown_stage_is_an_error(model):
  with pytest.raises(ValueError, match="stages are"):
    make_plan(model, [{"path": ".*", "method": "int8"}], order=("quantize", "distill"))
  with pytest.raises(ValueError, match="leaves out"):
    make_plan(model, [{"path": ".*", "method": "int8"}], order=("prune",))

"""experiments/configs/compress/prune.py: every variant validates, names the methods it says, and
resolves against a model; prune -> quantize stages are declared in the right order."""

import importlib.util
import pathlib

import pytest

from reslm.compress import make_plan, pipeline
from reslm.models import build_model
from tests.compress.common import CFG

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments/configs/compress/prune.py"
EXPECTED = {
  "magnitude50": {"magnitude"},
  "wanda50": {"wanda"},
  "sparsegpt50": {"sparsegpt"},
  "wanda_2_4": {"wanda"},
  "sparsegpt_2_4_int8": {"sparsegpt", "int8"},
  "sparsegpt_2_4_gptq4": {"sparsegpt", "gptq"},
  "svd_energy90": {"svd"},
  "svd_p60": {"svd"},
  "svd_llm_p60": {"svd_llm"},
  "asvd_p60": {"asvd"},
  "asvd_uniform_p60": {"asvd"},
  "smoke": {"wanda"},
}


def load_config_module():
  spec = importlib.util.spec_from_file_location("_compress_prune_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_variant_validates_and_resolves():
  module = load_config_module()
  doc = module.__doc__
  assert "python -m experiments.compress --config=experiments/configs/compress/prune.py" in doc
  assert set(module.VARIANTS) == set(EXPECTED)
  model = build_model(CFG)
  for variant in (None, *module.VARIANTS):
    cfg = module.get_config(variant)
    pipeline.validate_config(cfg)
    assert variant is None or variant in doc
    plan = make_plan(model, cfg.rules, order=cfg.order)
    layer = {r.method.name for steps in plan.layer_steps.values() for _, r in steps}
    whole = {r.method.name for steps in plan.model_steps.values() for r, _ in steps}
    assert layer | whole == EXPECTED[variant or "wanda50"]
    assert all(t.name != "lm_head" for steps in plan.layer_steps.values() for t, _ in steps)
  plan = make_plan(model, module.get_config("sparsegpt_2_4_int8").rules)
  up = "layers/groups/blocks/0/mlp/up"
  assert [r.method.name for s in plan.order for t, r in plan.layer_steps[s] if t.name == up] == [
    "sparsegpt",
    "int8",
  ]
  with pytest.raises(ValueError, match="not known"):
    module.get_config("no-such-variant")

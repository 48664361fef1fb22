"""Every ablation file loads, and every (task, arm) it defines gives a model that builds."""

import glob
import os

import pytest
from flax import nnx

from experiments import ablate
from reslm.models import build_model
from reslm.training.config import model_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = sorted(
  f
  for f in glob.glob(os.path.join(REPO, "experiments/configs/ablations/*.py"))
  if not f.endswith("__init__.py")
)


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f) for f in FILES])
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_every_arm_of_every_task_builds(path, arg):
  ablation = ablate._load_module(path).get_ablation(arg)
  assert ablation["arms"] and ablation["tasks"]
  assert ablation.get("cost", "flops_per_token") in ablate.COSTS
  for task in ablation["tasks"].values():
    for arm, overrides in ablation["arms"].items():
      cfg = ablate.load_task_config(os.path.join(REPO, task["config"]))
      tweaks = task.get("arm_overrides", {}).get(arm, {})
      ablate.apply_overrides(cfg, {**task.get("overrides", {}), **overrides, **tweaks})
      # Mixer and MLP options are checked when the layers are built: trace, don't allocate.
      nnx.eval_shape(lambda cfg=cfg: build_model(model_config(cfg, 64)))

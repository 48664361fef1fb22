"""The generic ablation runner: overrides, resumable arms, table/JSON/Pareto outputs."""

import json
import os
import subprocess
import sys

import pytest

from experiments import ablate
from experiments.configs import mqar

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_apply_overrides_sets_dotted_settings_and_rejects_unknown_paths():
  cfg = mqar.get_config("smoke")
  ablate.apply_overrides(cfg, {"model.mixer": "dense,dense", "model.mixer_options": {"a": 1}})
  assert cfg.model.mixer == "dense,dense"
  assert dict(cfg.model.mixer_options) == {"a": 1}
  with pytest.raises(ValueError, match="'nope' is not a setting of model"):
    ablate.apply_overrides(cfg, {"model.nope": 1})
  with pytest.raises(ValueError, match="'nope' is not a config section"):
    ablate.apply_overrides(cfg, {"nope.x": 1})


def test_finished_rows_without_counted_flops_get_them_from_their_config(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  ablation = ablate._load_module("experiments/configs/ablations/mixers.py").get_ablation("smoke")
  task, arm = ablation["tasks"]["mqar"], ablation["arms"]["mamba"]
  old_row = {"eval_accuracy": 0.5, "xla_flops_per_token": 1.0}  # As written before the count.
  (tmp_path / "ablation_row.json").write_text(json.dumps(old_row))
  row = ablate.run_arm(task, arm, str(tmp_path), steps=0)
  expected = ablate.config_flops(ablate.arm_config(task, arm), xla_loop_free=True)
  assert row == {
    **old_row,
    "flops_per_token": expected["train_per_token"],
    "flops_source": expected["source"],
    "xla_loop_free_flops_per_token": expected["xla_loop_free_train_per_token"],
  }
  assert json.loads((tmp_path / "ablation_row.json").read_text()) == row  # Nothing retrained.


@pytest.mark.subprocess
def test_smoke_sweep_writes_rows_and_resumes(tmp_path, monkeypatch):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [
    sys.executable,
    "-m",
    "experiments.ablate",
    "--ablation=experiments/configs/ablations/attention.py:smoke",
    f"--workdir={tmp_path}",
    "--arms=dense",
    "--steps=10",
  ]
  first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "== mqar: eval_accuracy" in first.stdout
  out = json.loads((tmp_path / "ablation.json").read_text())
  row = out["results"]["mqar"]["dense"]
  for key in ("eval_accuracy", "eval_loss", "train_tokens_per_s", "peak_bytes", "params"):
    assert key in row
  # The cost axis is the report's counted FLOPs, the same figure the arm's config gives.
  monkeypatch.chdir(REPO)
  task = ablate._load_module("experiments/configs/ablations/attention.py").get_ablation("smoke")
  cfg = ablate.arm_config(task["tasks"]["mqar"], task["arms"]["dense"], steps=10)
  assert row["flops_per_token"] == ablate.config_flops(cfg)["train_per_token"]
  assert (tmp_path / "pareto_mqar.png").exists()
  # A second invocation reuses the finished run instead of training again.
  stamp = (tmp_path / "mqar" / "dense" / "ablation_row.json").stat().st_mtime_ns
  second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert second.returncode == 0
  assert "data:" not in second.stdout  # Nothing was rebuilt or trained.
  assert (tmp_path / "mqar" / "dense" / "ablation_row.json").stat().st_mtime_ns == stamp

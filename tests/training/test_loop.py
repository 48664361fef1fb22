"""The training loop in-process: learning, exact resume, logs, the efficiency report, configs.

Runs `train_and_evaluate` on the MQAR smoke config (shrunk further where useful) and checks that
the loss falls, that a run stopped and resumed in the same workdir ends bit-identical to an
uninterrupted one, that the TensorBoard events agree with metrics.jsonl, that the efficiency
report has its sections, and that every shipped experiment config and variant validates.
"""

import importlib.util
import json
import math
import pathlib
import shutil

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from experiments.configs import mqar
from reslm.models.config import ModelConfig
from reslm.training import Checkpointer, RunResult, train_and_evaluate, validate_experiment
from reslm.training.loop import init_state
from tests.shared_runs import shared_dir

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs"
# fmt: off
REPORT_SECTIONS = {
  "params", "flops", "time", "throughput", "mfu", "memory", "energy", "carbon", "cost", "host",
  "extra",
}
# fmt: on


def smoke(**train):
  """The smoke config without the matmul-peak measurement or best checkpoints, plus overrides."""
  cfg = mqar.get_config("smoke")
  cfg.report.measure_peak = False
  cfg.checkpoint.keep_best = False
  cfg.checkpoint.async_save = False
  cfg.train.update(train)
  return cfg


def read_jsonl(workdir) -> list[dict]:
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def restore_final(workdir):
  """The full TrainState of the latest checkpoint in `workdir`, and its step."""
  ckpt = Checkpointer(str(workdir), keep_best=False, async_save=False)
  meta = ckpt.read_meta()
  cfg = json.loads((pathlib.Path(workdir) / "config.json").read_text())
  tc = mqar.get_config("smoke").train
  tc.update(cfg["train"])
  model_cfg = ModelConfig.from_config_dict(meta["model"])
  target = jax.eval_shape(lambda: init_state(model_cfg, tc, seed=0)[1])
  state, _, step = ckpt.restore(target)
  ckpt.close()
  return state, step


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  """A 100-step smoke run (read-only) and its RunResult."""

  def build(workdir):
    cfg = smoke(steps=100, log_every=10, eval_every=50, learning_rate=3e-3)
    cfg.checkpoint.every = 0
    result = train_and_evaluate(cfg, str(workdir))
    assert result.report is not None
    fields = dict(
      step=result.step, train_loss=result.train_loss, eval=result.eval, preempted=result.preempted
    )
    (workdir / "run_result.json").write_text(json.dumps(fields))

  workdir = shared_dir(tmp_path_factory, "loop_short_run", build)
  fields = json.loads((workdir / "run_result.json").read_text())
  return workdir, RunResult(report=None, **fields)


def test_loss_decreases_on_mqar(short_run):
  workdir, result = short_run
  losses = [r["loss"] for r in read_jsonl(workdir) if "loss" in r]
  assert len(losses) == 10
  assert all(math.isfinite(x) for x in losses)
  assert losses[-1] < losses[0] - 0.3, losses
  assert result.step == 100 and not result.preempted
  assert result.train_loss == losses[-1]
  vocab = Checkpointer(str(workdir), keep_best=False).read_meta()["model"]["vocab_size"]
  assert result.eval["eval_loss"] < math.log(vocab) - 0.3  # Below the uniform-guess loss.


def test_tensorboard_events_match_metrics_jsonl(short_run):
  workdir, _ = short_run
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"scalars": 0})
  acc.Reload()
  expected: dict[str, list[tuple[int, float]]] = {}
  for record in read_jsonl(workdir):
    for key, value in record.items():
      if key not in ("step", "time"):
        expected.setdefault(key, []).append((record["step"], value))
  assert {"loss", "accuracy", "grad_norm", "learning_rate", "eval_loss"} <= set(expected)
  assert set(acc.Tags()["scalars"]) == set(expected)
  for tag, points in expected.items():
    events = acc.Scalars(tag)
    assert [e.step for e in events] == [s for s, _ in points], tag
    # Events store float32; the JSONL keeps the float64 the loop computed.
    np.testing.assert_array_equal(
      np.float32([e.value for e in events]), np.float32([v for _, v in points]), err_msg=tag
    )


def test_efficiency_report_written(short_run):
  workdir, result = short_run
  report = json.loads((workdir / "efficiency_report.json").read_text())
  assert set(report) >= REPORT_SECTIONS
  state, step = restore_final(workdir)
  assert step == 100
  n_params = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
  assert report["params"]["total"] == n_params
  assert report["extra"]["eval"] == pytest.approx(result.eval)
  assert report["time"]["steps_timed"] >= 1
  assert report["throughput"]["train_tokens_per_s"] > 0
  assert report["host"]["device_count"] == jax.device_count()


def test_rerun_rejected_for_other_model_keeps_config_json(short_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(short_run[0], workdir)
  before = (workdir / "config.json").read_text()
  cfg = smoke(steps=100)
  cfg.model.d_model = 64
  with pytest.raises(ValueError, match="different model"):
    train_and_evaluate(cfg, str(workdir))
  # load_run / evaluate / generate read this file: it must still describe the checkpoints.
  assert (workdir / "config.json").read_text() == before


def test_resumed_run_matches_uninterrupted_run(tmp_path):
  def cfg(steps):
    c = smoke(steps=steps, decay_steps=40, log_every=10, eval_every=1000)
    c.checkpoint.every = 0  # Only the end (step 20, then 40) is saved.
    return c

  interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
  first = train_and_evaluate(cfg(20), str(interrupted))
  assert first.step == 20
  mid, mid_step = restore_final(interrupted)
  assert mid_step == 20
  resumed = train_and_evaluate(cfg(40), str(interrupted))
  reference = train_and_evaluate(cfg(40), str(straight))
  assert resumed.step == reference.step == 40
  a, step_a = restore_final(interrupted)
  b, step_b = restore_final(straight)
  assert step_a == step_b == 40
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The second half really trained (resumed from 20, not restarted or skipped).
  assert not np.array_equal(
    np.asarray(mid.params["embed"]["embedding"]), np.asarray(a.params["embed"]["embedding"])
  )
  logged = [r["step"] for r in read_jsonl(interrupted) if "loss" in r]
  assert logged == [10, 20, 30, 40]
  assert resumed.train_loss == reference.train_loss


def _config_modules():
  return sorted(p for p in CONFIGS_DIR.glob("*.py") if not p.name.startswith("_"))


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_files_found():
  assert "mqar.py" in {p.name for p in _config_modules()}


@pytest.mark.parametrize("path", _config_modules(), ids=lambda p: p.name)
def test_every_config_and_variant_validates(path):
  module = _load(path)
  assert isinstance(module.VARIANTS, tuple) and module.VARIANTS
  for variant in (None, *module.VARIANTS):
    cfg = module.get_config(variant)
    if cfg.data.get("tokenizer") == "hf" and not cfg.data.get("tokenizer_path"):
      # experiments/configs/hf.py is a template that `experiments.convert` completes.
      cfg.data.tokenizer_path = str(CONFIGS_DIR.parents[1] / "tests/fixtures/hf/llama_gqa_untied")
    model = validate_experiment(cfg)
    assert model.kind in ("decoder", "encoder"), (path.name, variant)
  with pytest.raises(ValueError, match="not known"):
    module.get_config("no-such-variant")

"""`experiments.compress`: every config variant validates; the pipeline compresses a run, writes a
checkpoint that reloads exactly and a consistent report; bad input exits in one line."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from experiments.configs import mqar
from reslm import data as data_lib
from reslm.compress import load_compressed, pipeline
from reslm.compress.quantize import Int8Linear, W8A8Linear
from reslm.models import build_model
from reslm.training import Checkpointer, TrainState, build_optimizer, model_config
from reslm.training.loop import run_meta
from tests.compress.common import CFG

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments/configs/compress/quantize.py"


def load_config_module(path=CONFIG):
  spec = importlib.util.spec_from_file_location(f"_compress_{path.stem}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("tie", [True, False])
def test_prune_variants_plan_on_tied_and_untied_models(tie):
  """The prune rules select the block projections whether or not the model has an lm_head."""
  import dataclasses

  from reslm.compress.rules import make_plan

  module = load_config_module(ROOT / "experiments/configs/compress/prune.py")
  model = build_model(dataclasses.replace(CFG, tie_embeddings=tie))
  for variant in module.VARIANTS:
    make_plan(model, module.get_config(variant).rules)


def test_every_variant_validates():
  module = load_config_module()
  assert module.__doc__.lstrip().startswith("Post-training") and "smoke" in module.VARIANTS
  for variant in (None, *module.VARIANTS):
    pipeline.validate_config(module.get_config(variant))
  with pytest.raises(ValueError, match="not known"):
    module.get_config("no-such-variant")


def make_run(workdir: pathlib.Path) -> None:
  """A run directory as `experiments.train` leaves it (initial weights: training is not the
  point here)."""
  cfg = mqar.get_config("smoke")
  model = CFG.to_dict()  # the compress tests' shapes (shared compilations)
  cfg.model.update(
    {k: model[k] for k in ("d_model", "num_heads", "num_layers", "mixer", "tie_embeddings")}
  )
  dataset = data_lib.build_dataset(cfg.data)
  model_cfg = model_config(cfg, dataset.vocab_size)
  # What `training.loop.init_state` builds, made eagerly (no compilation).
  params = nnx.to_pure_dict(nnx.state(build_model(model_cfg)))
  state = TrainState.create(params, build_optimizer(cfg.train, params))
  ckpt = Checkpointer(str(workdir), keep=cfg.checkpoint.keep, async_save=False)
  ckpt.save(0, state, run_meta(model_cfg, dataset))
  ckpt.wait()
  ckpt.close()
  (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2, sort_keys=True))


def test_pipeline_compresses_evaluates_and_reloads(tmp_path):
  run_dir, out = tmp_path / "run", tmp_path / "out"
  make_run(run_dir)
  cfg = pipeline.get_default_config()
  cfg.rules = [
    {"path": r".*/mlp/.*", "method": "smoothquant"},
    {"path": r".*", "method": "int8"},
    {"path": r".*/mixer", "method": "kv_int8"},
  ]
  cfg.calibration.update(num_sequences=4, batch_size=4, max_tokens=64)
  cfg.eval_batches = 2
  report = pipeline.run(cfg, str(run_dir), str(out))

  assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
  assert report["calibration"] == {"sequences": 4, "seq_len": 32, "tokens_per_layer": 64}
  sizes = report["bytes"]
  assert 3 < sizes["selected_ratio"] < 4  # float32 -> int8 plus a float32 scale per channel
  assert sizes["model_after"] < sizes["model_before"]
  ev = report["eval"]
  assert ev["loss_change"] == pytest.approx(ev["after"]["eval_loss"] - ev["before"]["eval_loss"])
  assert abs(ev["loss_change_pct"]) < 1.0
  assert report["fidelity"]["top1_agreement"] > 0.9 and 0 <= report["fidelity"]["kl"] < 1e-3
  assert report["reload_max_abs_logit_diff"] == 0.0
  rows = {r["path"]: r for r in report["layers"]}
  down = rows["layers/groups/blocks/0/mlp/down"]
  assert down["methods"] == ["smoothquant"] and down["class"] == "W8A8Linear"
  assert len(down["slices"]) == 2 and all(s["output_rel_error"] < 0.05 for s in down["slices"])
  assert "output_rel_error" not in rows["layers/groups/blocks/0/mixer/q"]["slices"][0]

  model, meta = load_compressed(str(out))
  assert meta["compress"]["source"]["step"] == 0
  block = model.layers.groups.blocks[0]
  assert isinstance(block.mlp.up, W8A8Linear) and isinstance(block.mixer.o, Int8Linear)
  assert np.asarray(block.mlp.up.w_q[...]).dtype == np.int8


def test_cli_bad_workdir_is_one_line(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.compress",
      f"--config={CONFIG.relative_to(ROOT)}:smoke",
      f"--workdir={tmp_path / 'missing'}",
      f"--out={tmp_path / 'out'}",
    ],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --workdir=") and "no run" in lines[0]

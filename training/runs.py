"""A training run: its directory, its state, and loading it back.

- The directory: `claim_workdir` (only a new or empty directory or an earlier run of
  `experiments.train` is written into, see `training.ownership`), `config.json`, and
  `truncate_metrics` (a resumed run drops the log rows past the step it resumed from, so
  `metrics.jsonl` has one row per step and kind).
- The state: `init_state` (built in one compiled program, optionally sharded) and
  `abstract_state` (shapes only), and `run_meta`, the JSON stored with every checkpoint.
- `load_run(workdir)`: the config and trained model from a workdir alone, on this process's first
  device, from a checkpoint written on any topology (evaluation, generation, compression).
"""

import json
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from reslm.models import build_model
from reslm.models.config import ModelConfig
from reslm.training import ownership
from reslm.training.checkpoint import Checkpointer
from reslm.training.optim import build_optimizer
from reslm.training.steps import OBJECTIVE_PARAMS, TrainState, model_params

TRAIN_RUN = ownership.Kind(
  command="experiments.train",
  what="a training run",
  outputs=(
    "config.json",
    "checkpoints/",
    "best/",
    "best.unreadable*/",
    "metrics.jsonl",
    "text.jsonl",
    "events.out.tfevents.*",
    "efficiency_report.json",
    "eval.json",
    "teacher_samples.npz",
    "compile_only_*.json",
    "ablation_row.json",
  ),
)


def claim_workdir(workdir: str, *, write: bool = True) -> None:
  """Refuses (one-line ValueError) a workdir holding anything but a run; marks it as a run.

  Every process checks; with `write`, process 0 creates the directory and writes the marker.
  """
  ownership.claim(workdir, TRAIN_RUN, flag="--workdir", write=write and jax.process_index() == 0)


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))


def truncate_metrics(workdir: str, step: int, name: str = "metrics.jsonl") -> int:
  """Drops the rows of `workdir/name` logged after `step` (the resumed run logs them again).

  Returns:
    How many rows were dropped.
  """
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row_step = json.loads(line).get("step", 0)
    except ValueError:
      continue  # A line torn by a kill mid-write.
    if row_step <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) != len(lines):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return len(lines) - len(kept)


def _tokenizer_meta(dataset) -> dict | None:
  tok = dataset.tokenizer
  return tok.to_dict() if tok is not None else None


def run_meta(model_cfg: ModelConfig, dataset) -> dict[str, Any]:
  """The JSON stored with every checkpoint."""
  return {"model": model_cfg.to_dict(), "tokenizer": _tokenizer_meta(dataset)}


def init_state(
  model_cfg: ModelConfig, train_cfg, *, seed: int, shardings=None, objective_params=None
):
  """Builds the model and a fresh TrainState; returns (graphdef, state, optimizer).

  Initialisation runs as one compiled program: faster than op-by-op eager creation, and the
  parameters are never materialised twice. With `shardings` (a TrainState of shardings, see
  `training.loop.placement`) each device creates only its own shards. `objective_params`
  (`Objective.init_params`) adds an objective's own trainable parameters under
  `params[OBJECTIVE_PARAMS]`.
  """
  box = {}

  def make():
    graphdef, params = nnx.split(build_model(model_cfg, seed=seed))
    params = params.to_pure_dict()
    if objective_params is not None:
      params[OBJECTIVE_PARAMS] = objective_params()
    tx = build_optimizer(train_cfg, params)
    box["graphdef"], box["tx"] = graphdef, tx
    return TrainState.create(params, tx)

  placed = {} if shardings is None else {"out_shardings": shardings}
  state = jax.jit(make, **placed)()
  return box["graphdef"], state, box["tx"]


def abstract_state(model_cfg, train_cfg, objective_params=None):
  """(graphdef, TrainState of ShapeDtypeStructs, optimizer) without creating any array."""
  out = {}

  def build():
    graphdef, state, tx = init_state(
      model_cfg, train_cfg, seed=0, objective_params=objective_params
    )
    out["graphdef"], out["tx"] = graphdef, tx
    return state

  abstract = jax.eval_shape(build)
  return out["graphdef"], abstract, out["tx"]


def load_run(workdir: str, *, best: bool = False):
  """Rebuilds a trained model from a workdir alone.

  Reads the newest intact checkpoint (a damaged one is skipped with a warning) on this process
  only, onto its first device: no other process of a multi-process job takes part, and the
  checkpoint may come from any number of processes.

  Returns:
    (config, model with restored parameters, checkpoint meta, step).

  Raises:
    ValueError: No run or no intact checkpoint in `workdir`.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"--workdir={workdir} holds no run (no config.json); train there first")
  try:
    with open(path) as f:
      cfg = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} could not be read: {e}") from e
  ckpt = Checkpointer(workdir, keep_best=best, read_only=True)
  graphdef = None

  def target(meta):
    nonlocal graphdef
    model_cfg = ModelConfig.from_config_dict(meta["model"])
    extra = meta.get("objective_params")  # An objective's parameters (distillation projections).
    init_extra = None
    if extra is not None:
      is_leaf = lambda x: isinstance(x, dict) and set(x) == {"shape", "dtype"}
      init_extra = lambda: jax.tree.map(
        lambda x: jax.numpy.zeros(x["shape"], x["dtype"]), extra, is_leaf=is_leaf
      )
    graphdef, abstract, _ = abstract_state(model_cfg, cfg.train, init_extra)
    return abstract

  try:
    state, meta, step = ckpt.restore(target, best=best)
  finally:
    ckpt.close()
  model = nnx.merge(graphdef, model_params(state.params))
  return cfg, model, meta, step

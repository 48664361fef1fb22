"""Run a sweep of config variations ("arms") over one or more tasks and compare quality vs cost.

  python -m experiments.ablate --ablation=experiments/configs/ablations/attention.py[:smoke] \
      --workdir=/tmp/ablate_attention [--arms=dense,flash] [--tasks=mqar] [--steps=300]

An ablation file defines `get_ablation(arg) -> dict` with:
  tasks: {name: {"config": "experiments/configs/x.py[:variant]", "overrides": {dotted: value},
                 "quality": "eval_accuracy" | "eval_loss" | ..., "higher_is_better": bool,
                 "arm_overrides": {arm: {dotted: value}}  (optional, per-task tweaks of an arm)}}
  arms:  {name: {dotted.setting: value}}   (applied on top of each task's config)
  cost:  row field for the Pareto x-axis: "flops_per_token" (default),
         "xla_loop_free_flops_per_token", "xla_flops_per_token", "peak_bytes" or "step_s".
Each (task, arm) trains in <workdir>/<task>/<arm> through the normal training loop; finished runs
are reused, so an interrupted sweep resumes. Prints one table per task (quality, tokens/s, compiled
peak memory, FLOPs/token, parameters) and writes <workdir>/ablation.json and a Pareto plot per
task (<workdir>/pareto_<task>.png).

FLOPs/token is the report's model count (`training.flops.model_flops`: forward matmul FLOPs with
every loop counted, times 3); `xla_loop_free_flops_per_token` is XLA's count of every op of the
loss's forward and backward pass with every loop unrolled (elementwise work and rematerialisation
included). Both are functions of the arm's config alone: a finished row without them gets them
computed from its config, without retraining. `xla_flops_per_token` is XLA's count of the compiled
step, which visits each loop body once (an undercount, kept for comparison only).
"""

import importlib.util
import json
import os
import sys

from absl import flags

from experiments import cli

flags.DEFINE_string(
  "ablation", None, "Ablation file, optionally with an argument: path.py[:arg].", required=True
)
cli.define_workdir_flag()
flags.DEFINE_list("arms", [], "Only these arms (default: all).")
flags.DEFINE_list("tasks", [], "Only these tasks (default: all).")
flags.DEFINE_integer("steps", 0, "Override train.steps for every run (0 = the task's own).")
FLAGS = flags.FLAGS


def _holds_runs(path: str, key=None) -> bool:
  """An unmarked sweep directory: every subdirectory is a task whose entries are arm runs."""
  from reslm.training.runs import TRAIN_RUN

  del key
  for task in os.listdir(path):
    task_dir = os.path.join(path, task)
    if not os.path.isdir(task_dir):
      continue
    for arm in os.listdir(task_dir):
      arm_dir = os.path.join(task_dir, arm)
      if not (os.path.isdir(arm_dir) and TRAIN_RUN.written_by(arm_dir)):
        return False
  return True


def sweep_kind():
  """What `--workdir` holds: `ablation.json`, Pareto plots and <task>/<arm>/ training runs."""
  from reslm.training.ownership import Kind

  return Kind(
    command="experiments.ablate",
    what="an ablation sweep",
    outputs=("ablation.json", "pareto_*.png", "*/"),
    recognize=_holds_runs,
  )


COSTS = (
  "flops_per_token",
  "xla_loop_free_flops_per_token",
  "xla_flops_per_token",
  "peak_bytes",
  "step_s",
)


def _load_module(path: str):
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file")
  spec = importlib.util.spec_from_file_location(f"_abl_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_task_config(spec: str):
  """`path.py[:variant]` -> that experiment's ConfigDict."""
  path, _, variant = spec.partition(":")
  return _load_module(path).get_config(variant or None)


def apply_overrides(cfg, overrides: dict) -> None:
  """Sets dotted settings ("model.mixer_options") on a ConfigDict; unknown paths are errors."""
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = cfg
    for key in parents:
      if key not in node:
        raise ValueError(f"override {dotted}: {key!r} is not a config section")
      node = node[key]
    if leaf not in node:
      raise ValueError(f"override {dotted}: {leaf!r} is not a setting of {'.'.join(parents)}")
    node[leaf] = value


def _row(report: dict, result_eval: dict) -> dict:
  return {
    **result_eval,
    "train_tokens_per_s": report["throughput"]["train_tokens_per_s"],
    "step_s": report["time"]["step_median_s"],
    "peak_bytes": report["memory"]["peak_bytes"],
    "flops_per_token": report["flops"]["train_per_token"],
    "flops_source": report["mfu"]["flops_source"],
    "xla_flops_per_token": report["flops"]["xla_flops_per_token"],
    "params": report["params"]["total"],
    "active_params": report["params"].get("active_per_token", report["params"]["total"]),
    "wall_s": report["time"]["total_wall_s"],
  }


def arm_config(task: dict, overrides: dict, steps: int = 0):
  """The experiment config of one (task, arm): the task's config with both sets of overrides."""
  cfg = load_task_config(task["config"])
  apply_overrides(cfg, {**task.get("overrides", {}), **overrides})
  if steps:
    cfg.train.steps = steps
    cfg.train.decay_steps = steps
  return cfg


def config_flops(cfg, *, xla_loop_free: bool = False) -> dict:
  """The model FLOPs per token a training run of `cfg` reports (`training.flops.model_flops`),
  computed without training; with `xla_loop_free`, XLA's loop-free count as well."""
  from reslm import data as data_lib
  from reslm.training import config as config_lib
  from reslm.training.flops import model_flops

  model_cfg = config_lib.model_config(cfg, data_lib.build_dataset(cfg.data).vocab_size)
  micro = cfg.data.batch_size // cfg.train.grad_accum_steps
  return model_flops(
    model_cfg, batch_size=micro, seq_len=cfg.data.seq_len, xla_loop_free=xla_loop_free
  )


_COUNTED = ("flops_per_token", "flops_source", "xla_loop_free_flops_per_token")


def _counted_costs(cfg) -> dict:
  counted = config_flops(cfg, xla_loop_free=True)
  return dict(
    zip(
      _COUNTED,
      (counted["train_per_token"], counted["source"], counted["xla_loop_free_train_per_token"]),
      strict=True,
    )
  )


def run_arm(task: dict, overrides: dict, workdir: str, steps: int) -> dict:
  """Trains one (task, arm) unless it already finished; returns its row."""
  done = os.path.join(workdir, "ablation_row.json")
  cfg = arm_config(task, overrides, steps)
  if os.path.exists(done):
    with open(done) as f:
      row = json.load(f)
    if any(key not in row for key in _COUNTED):  # A row from before the counts were recorded.
      row.update({k: v for k, v in _counted_costs(cfg).items() if k not in row})
      with open(done, "w") as f:
        json.dump(row, f, indent=2)
    return row
  from reslm.training import train_and_evaluate

  cfg.train.progress_bar = False
  result = train_and_evaluate(cfg, workdir)
  if result.preempted:
    raise SystemExit(
      f"{workdir}: preempted at step {result.step}; rerun the same command to resume"
    )
  row = _row(result.report, result.eval)
  row["xla_loop_free_flops_per_token"] = _counted_costs(cfg)["xla_loop_free_flops_per_token"]
  with open(done, "w") as f:
    json.dump(row, f, indent=2)
  return row


def _print_table(task_name: str, task: dict, rows: dict) -> None:
  q = task["quality"]
  print(f"\n== {task_name}: {q} ({'higher' if task['higher_is_better'] else 'lower'} is better)")
  # GFLOP/tok: the counted model FLOPs; XLA GFLOP/tok: every op, every loop iteration.
  print(
    f"{'arm':22s}{q:>14s}{'tokens/s':>11s}{'peak MiB':>10s}{'GFLOP/tok':>11s}"
    f"{'XLA GFLOP/tok':>15s}{'params':>10s}{'active':>10s}"
  )
  for arm, row in rows.items():
    if "error" in row:
      print(f"{arm:22s}  error: {row['error']}")
      continue
    flops, xla = row["flops_per_token"] or 0, row["xla_loop_free_flops_per_token"] or 0
    print(
      f"{arm:22s}{row.get(q, float('nan')):14.4f}{row['train_tokens_per_s']:11.0f}"
      f"{(row['peak_bytes'] or 0) / 2**20:10.1f}{flops / 1e9:11.4f}{xla / 1e9:15.4f}"
      f"{row['params']:10d}{row.get('active_params', row['params']):10d}"
    )


def _plot(task_name: str, task: dict, rows: dict, cost: str, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from reslm.metrics import pareto_front

  arms = [a for a, r in rows.items() if "error" not in r]
  xs = [rows[a][cost] for a in arms]
  ys = [rows[a].get(task["quality"]) for a in arms]
  front = pareto_front(xs, ys, higher_quality_is_better=task["higher_is_better"])
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.scatter(xs, ys)
  for a, x, y in zip(arms, xs, ys, strict=True):
    ax.annotate(a, (x, y), fontsize=7)
  # Markers as well as the line: a front of one arm (cheapest and best) has no line to draw.
  ax.plot(
    [xs[i] for i in front], [ys[i] for i in front], "ro--", mfc="none", ms=9, label="Pareto front"
  )
  ax.set(xlabel=cost, ylabel=task["quality"], title=f"{task_name}: quality vs cost")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


@cli.one_line_errors
def main(argv):
  del argv
  path, _, arg = FLAGS.ablation.partition(":")
  ablation = _load_module(path).get_ablation(arg or None)
  cost = ablation.get("cost", "flops_per_token")
  if cost not in COSTS:
    raise ValueError(f"ablation cost={cost!r} is not known; choose one of: {', '.join(COSTS)}")
  from reslm.training import ownership
  from reslm.training.runs import TRAIN_RUN

  # Each arm trains in <workdir>/<task>/<arm>; the sweep directory must be one (or new).
  ownership.claim(FLAGS.workdir, sweep_kind(), flag="--workdir", others=(TRAIN_RUN,))
  tasks = {k: v for k, v in ablation["tasks"].items() if not FLAGS.tasks or k in FLAGS.tasks}
  arms = {k: v for k, v in ablation["arms"].items() if not FLAGS.arms or k in FLAGS.arms}
  for name, wanted in (("task", FLAGS.tasks), ("arm", FLAGS.arms)):
    known = ablation["tasks" if name == "task" else "arms"]
    for w in wanted:
      if w not in known:
        raise ValueError(
          f"--{name}s: {w!r} is not in this ablation; choose from: {', '.join(known)}"
        )
  results = {}
  for task_name, task in tasks.items():
    rows = {}
    for arm, overrides in arms.items():
      workdir = os.path.join(FLAGS.workdir, task_name, arm)
      try:
        tweaks = task.get("arm_overrides", {}).get(arm, {})
        rows[arm] = run_arm(task, {**overrides, **tweaks}, workdir, FLAGS.steps)
      except ValueError as e:  # A bad arm (e.g. an unregistered variant) must not stop the sweep.
        rows[arm] = {"error": str(e).splitlines()[0]}
        print(f"{task_name}/{arm}: error: {rows[arm]['error']}", file=sys.stderr)
    results[task_name] = rows
    _print_table(task_name, task, rows)
    _plot(task_name, task, rows, cost, os.path.join(FLAGS.workdir, f"pareto_{task_name}.png"))
  with open(os.path.join(FLAGS.workdir, "ablation.json"), "w") as f:
    json.dump({"ablation": FLAGS.ablation, "cost": cost, "results": results}, f, indent=2)


if __name__ == "__main__":
  cli.run(main)

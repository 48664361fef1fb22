"""The training loop: build, resume, train, evaluate, checkpoint, report.

`train_and_evaluate(config, workdir)` is the whole job behind `python -m experiments.train`.
Each stage reads its own config section: data -> model -> optimizer -> mesh placement -> steps.
A run killed at any point resumes from its last checkpoint with the same command and continues
exactly (batches are a pure function of the step; the optimizer state is checkpointed), and
SIGTERM writes a checkpoint before the process exits. The run directory, its state and loading a
finished run live in `training.runs`.

An objective section (`training.objectives`, e.g. `distill` from `compress.distill`) changes only
the objective and the training batches: it returns a `training.steps.Objective` (a teacher's frozen parameters and a loss) and/or
a dataset whose train batches come from a teacher; checkpoints, resume, eval (plain cross-entropy
on the real validation data) and the report work as for any run.
"""

import dataclasses
import math
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from reslm import data as data_lib
from reslm import metrics as metrics_lib
from reslm.metrics.params import active_params
from reslm.models import build_model
from reslm.models.config import ModelConfig
from reslm.models.moe import expert_usage
from reslm.parallel import comm as comm_lib
from reslm.parallel import distributed as distributed_lib
from reslm.parallel import experts as experts_lib
from reslm.parallel import mesh as mesh_lib
from reslm.parallel import pipeline as pipeline_lib
from reslm.parallel import rules as rules_lib
from reslm.training import config as config_lib
from reslm.training import objectives, runs
from reslm.training.checkpoint import Checkpointer
from reslm.training.flops import model_flops
from reslm.training.optim import learning_rate_schedule
from reslm.training.runs import abstract_state, init_state, load_run, run_meta  # noqa: F401
from reslm.training.steps import (
  OBJECTIVE_PARAMS,
  Objective,
  TrainState,
  make_eval_step,
  make_multi_step,
  make_train_step,
  model_params,
)


class NonFiniteLossError(RuntimeError):
  """Raised when a step's loss or gradient is NaN/Inf and train.nonfinite == "stop"."""


@dataclasses.dataclass
class RunResult:
  """What a finished (or preempted) run reports back."""

  step: int
  train_loss: float | None
  eval: dict[str, float]
  report: dict[str, Any] | None
  preempted: bool = False


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a run's state and batches live.

  Attributes:
    mesh: The device mesh.
    rules: The logical-axis rules table (`parallel.rules`).
    specs: PartitionSpec per parameter (pure-dict layout).
    state: NamedSharding per TrainState leaf (optimizer state mirrors the parameters).
    batch: Sharding of a [batch, ...] array.
    abstract: The TrainState's shapes and dtypes.
    pipeline: Pipeline schedule settings (microbatches, schedule, repeats) when the mesh has a
      pipeline axis, else None.
    expert_all_to_all: Whether MoE layers run `parallel.experts` all-to-all dispatch.
    opt_state_device: With the optimizer state offloaded to host memory, its shardings on the
      devices (where the update runs); else None.
  """

  mesh: Any
  rules: Any
  specs: Any
  state: Any
  batch: Any
  abstract: Any
  pipeline: dict | None = None
  expert_all_to_all: bool = False
  opt_state_device: Any = None

  @property
  def stacked_batch(self):
    """Sharding of several batches stacked on a new leading axis."""
    return NamedSharding(self.mesh, P(None, *self.batch.spec))


def placement(
  model_cfg: ModelConfig, train_cfg, parallel_cfg, mesh, objective_params=None
) -> Placement:
  """Resolves the `parallel.rules` preset into shardings for the state and the batches.

  An objective's own parameters (`objective_params`, see `init_state`) have no logical axes, so
  they are replicated.
  """
  _, abstract, tx = abstract_state(model_cfg, train_cfg, objective_params)
  logical = rules_lib.logical_axes(nnx.state(nnx.eval_shape(lambda: build_model(model_cfg))))
  rules = rules_lib.get_rules(
    parallel_cfg.get("rules", rules_lib.AUTO),
    dict(mesh.shape),
    sequence_parallel=parallel_cfg.get("sequence_parallel", False),
  )
  specs = rules_lib.param_specs(logical, abstract.params, rules, mesh.shape)
  offload = bool(parallel_cfg.get("offload_opt_state", False))
  if offload:
    rules_lib.check_offload(mesh)
  shardings = rules_lib.state_shardings(abstract, specs, tx, mesh, offload_opt_state=offload)
  on_device = rules_lib.state_shardings(abstract, specs, tx, mesh) if offload else None
  batch = NamedSharding(mesh, P(rules_lib.batch_axes(rules) or None))
  pipeline = None
  if mesh.shape["pipeline"] > 1:
    pipeline = {
      "microbatches": rules_lib.pipeline_microbatches(parallel_cfg, mesh.shape),
      "schedule": parallel_cfg.get("pipeline_schedule", "gpipe"),
      "repeats": parallel_cfg.get("pipeline_repeats", 1),
    }
  return Placement(
    mesh=mesh,
    rules=rules,
    specs=specs,
    state=shardings,
    batch=batch,
    abstract=abstract,
    pipeline=pipeline,
    expert_all_to_all=mesh.shape["expert"] > 1
    and parallel_cfg.get("expert_dispatch", "all_to_all") == "all_to_all",
    opt_state_device=None if on_device is None else on_device.opt_state,
  )


def model_forward(place: Placement):
  """The train/eval forward `(model, inputs) -> ModelOutput` for `place`, or None for the
  model's own call: pipelined layers and/or all-to-all expert dispatch when the mesh has them."""
  if place.pipeline is None and not place.expert_all_to_all:
    return None

  def forward(model, inputs):
    if place.expert_all_to_all:
      experts_lib.use_expert_parallel(model, place.mesh)
    if place.pipeline is not None:  # Layers run as pipeline stages (shard_map + ppermute).
      return pipeline_lib.decoder_forward(model, inputs, mesh=place.mesh, **place.pipeline)
    return model(inputs)

  return forward


def jit_steps(graphdef, tx, place: Placement, train_cfg, objective: Objective | None = None):
  """The jitted train step (`train_cfg.steps_per_call` steps per call) and eval step.

  Both take and return arrays placed by `place`; the train step donates its state. Activation
  constraints inside the model resolve through `place.rules`. With an `objective` the train step
  takes its frozen arrays (replicated) as a third argument.
  """
  k = train_cfg.steps_per_call
  forward = model_forward(place)
  train_step = make_train_step(
    graphdef,
    tx,
    grad_accum_steps=train_cfg.grad_accum_steps,
    nonfinite=train_cfg.nonfinite,
    grad_shardings=place.state.params,
    forward=forward,
    opt_state_offload=(
      None if place.opt_state_device is None else (place.opt_state_device, place.state.opt_state)
    ),
    objective=objective,
  )
  replicated = NamedSharding(place.mesh, P())
  frozen = () if objective is None else (replicated,)
  step_fn = jax.jit(
    rules_lib.with_rules(make_multi_step(train_step, k), place.mesh, place.rules),
    in_shardings=(place.state, place.stacked_batch if k > 1 else place.batch, *frozen),
    out_shardings=(place.state, replicated),
    donate_argnums=0,
  )
  eval_fn = jax.jit(
    rules_lib.with_rules(make_eval_step(graphdef, forward), place.mesh, place.rules),
    in_shardings=(place.state.params, place.batch),
    out_shardings=replicated,
  )
  return step_fn, eval_fn


def replicate(tree, mesh):
  """`tree`'s arrays as global arrays replicated over `mesh` (an objective's frozen inputs, e.g.
  a teacher restored onto one device by `load_run`); every process holds the same values."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def parallel_summary(place: Placement) -> dict[str, Any]:
  """The mesh, the rules and the per-device bytes of parameters and optimizer state."""
  return {
    "mesh": {axis: int(n) for axis, n in place.mesh.shape.items()},
    "rules": {name: target for name, target in place.rules if target is not None},
    **rules_lib.placement_summary(place.abstract, place.state),
  }


def evaluate(eval_fn, params, batches, bytes_per_token: float | None) -> dict[str, float]:
  """Mean loss, perplexity, accuracy and (for text) bits per byte over fixed eval batches."""
  sums = [eval_fn(params, b) for b in batches]
  loss_sum = float(sum(s["loss_sum"] for s in sums))
  weight = float(sum(s["weight"] for s in sums))
  correct = float(sum(s["correct"] for s in sums))
  loss = loss_sum / max(weight, 1.0)
  out = {
    "eval_loss": loss,
    "eval_perplexity": math.exp(min(loss, 50.0)),
    "eval_accuracy": correct / max(weight, 1.0),
  }
  if bytes_per_token:
    out["eval_bits_per_byte"] = loss / math.log(2) / bytes_per_token
  return out


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop polls between steps (main thread only)."""

  def __init__(self):
    self.set = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. a notebook worker): no handler.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.set = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains `cfg` in `workdir`, resuming from the latest checkpoint there if any.

  Args:
    cfg: A full experiment config (see `training.config.get_base_config`).
    workdir: Run directory for checkpoints, logs and the efficiency report.

  Returns:
    A `RunResult`.

  Raises:
    ValueError: A bad setting (before anything is compiled), missing data, or a checkpoint in
      `workdir` from a different model.
    NonFiniteLossError: A NaN/Inf loss with train.nonfinite == "stop".
  """
  wall_start = time.perf_counter()
  config_lib.validate_experiment(cfg, num_devices=jax.device_count())
  runs.claim_workdir(workdir, write=False)  # Refused before any data is read.
  tc = cfg.train
  mesh = mesh_lib.make_mesh(cfg.parallel)
  dataset = data_lib.build_dataset(
    cfg.data, process_index=jax.process_index(), process_count=jax.process_count()
  )
  model_cfg = config_lib.model_config(cfg, dataset.vocab_size)
  is_chief = jax.process_index() == 0
  runs.claim_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)  # Every process (process 0 created it with the marker).
  objective, dataset = objectives.setup(cfg, model_cfg, dataset, workdir)
  init_extra = None if objective is None else objective.init_params
  _say(is_chief, f"data: {dataset.describe()}")

  place = placement(model_cfg, tc, cfg.parallel, mesh, init_extra)
  rules_lib.check_replicated(
    place.abstract.params, place.specs, place.rules, cfg.parallel.warn_replicated_mb
  )
  graphdef, state, tx = init_state(
    model_cfg, tc, seed=tc.seed, shardings=place.state, objective_params=init_extra
  )
  meta = run_meta(model_cfg, dataset)
  if OBJECTIVE_PARAMS in state.params:  # So `load_run` can rebuild the checkpoint's layout.
    meta["objective_params"] = jax.tree.map(
      lambda x: {"shape": list(x.shape), "dtype": str(x.dtype)}, state.params[OBJECTIVE_PARAMS]
    )
  ckpt = Checkpointer(
    workdir,
    keep=cfg.checkpoint.keep,
    keep_best=cfg.checkpoint.keep_best,
    async_save=cfg.checkpoint.async_save,
  )
  start_step = 0
  if ckpt.latest_step() is not None:
    state, _, start_step = ckpt.restore(state, expected_meta=meta)
    _say(is_chief, f"resumed from {ckpt.latest.directory} at step {start_step}")
  if is_chief:  # Only once the workdir is known to hold this model (or nothing).
    runs.write_config(cfg, workdir)
    for log in ("metrics.jsonl", "text.jsonl"):  # Rows past `start_step` are logged again.
      runs.truncate_metrics(workdir, start_step, log)

  batch_sharding = place.batch
  k = tc.steps_per_call
  stacked_sharding = place.stacked_batch

  def to_device(batch, sharding=batch_sharding):
    return distributed_lib.global_batch(batch, sharding)

  def train_batches(first_step: int):
    """The batches of steps [first_step, first_step + k), stacked when k > 1."""
    if k == 1:
      return to_device(dataset.train_batch(first_step))
    batches = [dataset.train_batch(first_step + i) for i in range(k)]
    return to_device(
      {key: np.stack([b[key] for b in batches]) for key in batches[0]}, stacked_sharding
    )

  step_fn, eval_fn = jit_steps(graphdef, tx, place, tc, objective)
  frozen = () if objective is None else (replicate(objective.frozen, place.mesh),)
  example = train_batches(start_step)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, example, *frozen).compile()
  compile_seconds = time.perf_counter() - t0
  eval_batches = [to_device(b) for b in dataset.eval_batches(tc.eval_batches)]

  peak = None
  if cfg.report.measure_peak:
    peak = metrics_lib.measure_matmul_peak(size=cfg.report.peak_matmul_size)["flops_per_second"]
  meter = metrics_lib.EnergyMeter(cpu_watts_per_core=cfg.report.cpu_watts_per_core).start()
  writer = metrics_lib.MetricWriter(workdir, enabled=is_chief)
  bar = _progress_bar(tc, start_step, is_chief)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  lr_schedule = learning_rate_schedule(tc)
  window_start, window_steps, step_seconds = time.perf_counter(), 0, []
  last_eval: dict[str, float] = {}
  train_loss = None
  preempted = False
  step = start_step
  with _SigtermFlag() as sigterm:
    batch = example
    while step < tc.steps:
      state, step_metrics = compiled(state, batch, *frozen)
      step += k
      window_steps += k
      if step < tc.steps:
        batch = train_batches(step)  # Prepared on the host while the step runs.
      if bar is not None:
        bar.update(k)
      if step % tc.log_every == 0 or step == tc.steps:
        step_metrics = jax.tree.map(lambda x: x[-1] if k > 1 else x, step_metrics)
        scalars = {key: float(v) for key, v in jax.device_get(step_metrics).items()}
        now = time.perf_counter()
        step_seconds.append((now - window_start) / window_steps)
        window_start, window_steps = now, 0
        scalars["tokens_per_s"] = tokens_per_step / step_seconds[-1]
        scalars["learning_rate"] = float(lr_schedule(step - 1))
        train_loss = scalars["loss"]
        _check_nonfinite(state, tc.nonfinite)
        writer.write_scalars(step, scalars)
        _show(bar, step, scalars)
      evaluated = step % tc.eval_every == 0 or step == tc.steps
      if evaluated:
        last_eval = evaluate(eval_fn, state.params, eval_batches, dataset.bytes_per_token)
        writer.write_scalars(step, last_eval)
        _show(bar, step, last_eval, eval_=True)
      if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == tc.steps:
        ckpt.save(step, state, meta)
      # The resumable checkpoint first: on a full disk the best copy must not take its space.
      if evaluated and cfg.checkpoint.keep_best:
        ckpt.save_best(step, state, meta, last_eval["eval_loss"])
      if evaluated:
        window_start = time.perf_counter()  # Eval (and saving) time is not step time.
      if sigterm.set:
        ckpt.save(step, state, meta)
        preempted = True
        _say(is_chief, f"SIGTERM at step {step}: checkpoint saved; exiting")
        break
  ckpt.wait()
  ckpt.close()
  if bar is not None:
    bar.close()
  energy = meter.stop()

  report = None
  if not preempted:
    report = _report(
      cfg,
      model_cfg,
      state,
      compiled,
      compile_seconds,
      step_seconds,
      tokens_per_step,
      time.perf_counter() - wall_start,
      energy,
      peak,
      last_eval,
      parallel=parallel_summary(place),
    )
    if is_chief:
      metrics_lib.write_report(report, os.path.join(workdir, "efficiency_report.json"))
  writer.close()
  return RunResult(
    step=step, train_loss=train_loss, eval=last_eval, report=report, preempted=preempted
  )


def _check_nonfinite(state: TrainState, policy: str) -> None:
  first = int(state.first_nonfinite_step)
  if first < 0:
    return
  if policy == "stop":
    raise NonFiniteLossError(
      f"non-finite loss or gradient at step {first}; that update was skipped and training "
      "stopped (train.nonfinite='stop'; 'skip' continues past such steps)"
    )
  logging.warning(
    "%d update(s) skipped for non-finite loss/gradient (first at step %d)",
    int(state.nonfinite_count),
    first,
  )


def _say(is_chief: bool, message: str) -> None:
  if is_chief:
    print(message, flush=True)


def _progress_bar(tc, start_step: int, is_chief: bool):
  if not (tc.progress_bar and is_chief):
    return None
  import sys

  from tqdm import tqdm

  return tqdm(
    total=tc.steps,
    initial=start_step,
    unit="step",
    dynamic_ncols=True,
    disable=not sys.stderr.isatty(),
  )


def _show(bar, step: int, scalars: dict[str, float], eval_: bool = False) -> None:
  if eval_:
    text = " ".join(f"{k}={v:.4f}" for k, v in scalars.items())
    if bar is not None and not bar.disable:
      bar.write(f"step {step}: {text}")
    elif bar is not None:
      print(f"step {step}: {text}", flush=True)
    return
  if bar is not None and not bar.disable:
    bar.set_postfix(loss=f"{scalars['loss']:.4f}", tok_s=f"{scalars['tokens_per_s']:.0f}")
  elif bar is not None:
    print(
      f"step {step}: loss={scalars['loss']:.4f} tokens/s={scalars['tokens_per_s']:.0f}", flush=True
    )


def _report(
  cfg,
  model_cfg,
  state,
  compiled,
  compile_seconds,
  step_seconds,
  tokens_per_step,
  wall_seconds,
  energy,
  peak,
  last_eval,
  parallel=None,
):
  params = model_params(state.params)  # The model's alone, not an objective's projections.
  n_params = metrics_lib.count_params(params)
  usage = expert_usage(model_cfg)  # Experts per token for MoE models: fewer active parameters.
  n_active = n_params if usage is None else active_params(params, **usage)
  # Counted on the microbatch one forward pass sees (per-call work is spread over its tokens).
  micro = cfg.data.batch_size // cfg.train.grad_accum_steps
  counted = model_flops(model_cfg, batch_size=micro, seq_len=cfg.data.seq_len)
  # Drop the first window (it absorbs first-call overheads) when there are enough.
  timed = step_seconds[1:] if len(step_seconds) > 2 else step_seconds
  return metrics_lib.build_report(
    params_total=n_params,
    params_trainable=n_params,
    params_active_per_token=n_active,
    model_flops=counted,
    compiled=compiled,
    tokens_per_step=tokens_per_step,
    steps_timed=len(timed),
    compile_seconds=compile_seconds,
    step_seconds=timed,
    total_wall_seconds=wall_seconds,
    energy=energy,
    peak_flops_per_second=peak,
    cfg=cfg.report,
    extra={
      "eval": last_eval,
      "scan_layers": model_cfg.scan_layers,
      "parallel": parallel,
      # Collective bytes per device per step, read from the compiled HLO (parallel.comm).
      "comm_bytes_per_step": comm_lib.per_step(compiled, cfg.train.steps_per_call),
    },
  )

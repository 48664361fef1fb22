"""The `train` and `checkpoint` sections, and validation of a whole experiment config.

`validate_experiment` runs every check, single-section and cross-section, before any data is read
or anything is compiled, so a bad flag fails in a second with a one-line message.
"""

import math

import ml_collections

from reslm import data as data_lib
from reslm.metrics import report as report_lib
from reslm.models.config import ModelConfig
from reslm.models.config import get_default_config as model_defaults
from reslm.parallel import mesh as mesh_lib
from reslm.parallel import rules as rules_lib
from reslm.training import objectives

NONFINITE_POLICIES = ("stop", "skip")
FLOAT_SETTINGS = (
  "learning_rate",
  "end_learning_rate",
  "b1",
  "b2",
  "eps",
  "weight_decay",
  "grad_clip",
)


def get_train_defaults() -> ml_collections.ConfigDict:
  """Defaults for the `train` section."""
  return ml_collections.ConfigDict(
    dict(
      seed=0,
      steps=1000,
      learning_rate=1e-3,
      end_learning_rate=1e-4,  # Cosine decay ends here at `decay_steps`.
      warmup_steps=100,
      decay_steps=0,  # 0: decay over all `steps`.
      b1=0.9,
      b2=0.99,
      eps=1e-8,
      weight_decay=0.1,  # Applied to matrices only, not to norms or biases.
      grad_clip=1.0,  # Global-norm clipping; 0 disables.
      grad_accum_steps=1,  # Microbatches per optimizer step (batch_size is the total).
      steps_per_call=1,  # Optimizer steps per compiled call (a device-side loop; small models).
      nonfinite="stop",  # On a NaN/Inf loss or gradient: "stop" with the step, or "skip" it.
      log_every=50,
      eval_every=250,
      eval_batches=20,
      progress_bar=True,
    )
  )


def get_checkpoint_defaults() -> ml_collections.ConfigDict:
  """Defaults for the `checkpoint` section."""
  return ml_collections.ConfigDict(
    dict(
      every=500,  # Save every N steps (and at the end, and on SIGTERM); 0 = only at the end.
      keep=3,  # Most recent checkpoints kept.
      keep_best=True,  # Also keep the checkpoint with the lowest eval loss under workdir/best.
      async_save=True,
    )
  )


def get_base_config() -> ml_collections.ConfigDict:
  """Every section with its defaults; experiment files start from this."""
  return ml_collections.ConfigDict(
    dict(
      name="experiment",
      model=model_defaults(),
      data=data_lib.get_default_config(),
      train=get_train_defaults(),
      checkpoint=get_checkpoint_defaults(),
      parallel=mesh_lib.get_default_config(),
      report=report_lib.get_default_config(),
    )
  )


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
  """The typed model config, with vocab_size=0 resolved to the data's vocabulary."""
  d = cfg.model.to_dict()
  if vocab_size is not None:
    if d["vocab_size"] == 0:
      d["vocab_size"] = vocab_size
    elif d["vocab_size"] < vocab_size:
      raise ValueError(
        f"model.vocab_size={d['vocab_size']} is smaller than the data's vocabulary of "
        f"{vocab_size} tokens; use >= {vocab_size} or 0 (take it from the data)"
      )
  elif d["vocab_size"] == 0:
    d["vocab_size"] = 1  # Placeholder so the other fields can be checked before data is read.
  return ModelConfig.from_config_dict(d)


def _positive(section: str, cfg, *names: str) -> None:
  for name in names:
    if cfg[name] <= 0:
      raise ValueError(f"{section}.{name}={cfg[name]} must be > 0")


def validate_experiment(cfg: ml_collections.ConfigDict, *, num_devices: int = 1) -> ModelConfig:
  """Checks a whole experiment config; returns the (vocab-unresolved) model config.

  Raises:
    ValueError: One line naming the first bad setting, its value and what is allowed.
  """
  known = {"name", "model", "data", "train", "checkpoint", "parallel", "report", "compress"}
  known |= set(objectives.SECTIONS)
  unknown = sorted(set(cfg.keys()) - known)
  if unknown:
    raise ValueError(
      f"config section {unknown[0]!r} is not known; sections: {', '.join(sorted(known))}"
    )
  model = model_config(cfg)
  data_lib.validate_config(cfg.data)
  t = cfg.train
  for name in FLOAT_SETTINGS:  # NaN passes every comparison below, so it is caught here.
    value = t[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
      raise ValueError(f"train.{name}={value} must be a finite number")
  for name in ("b1", "b2"):
    if not 0 <= t[name] < 1:
      raise ValueError(f"train.{name}={t[name]} must be in [0, 1)")
  _positive(
    "train",
    t,
    "steps",
    "learning_rate",
    "log_every",
    "eval_every",
    "eval_batches",
    "grad_accum_steps",
    "steps_per_call",
  )
  k = t.steps_per_call
  for section, name in (
    ("train", "steps"),
    ("train", "log_every"),
    ("train", "eval_every"),
    ("checkpoint", "every"),
  ):
    if cfg[section][name] % k:
      raise ValueError(
        f"{section}.{name}={cfg[section][name]} is not a multiple of train.steps_per_call={k}"
      )
  for name in ("warmup_steps", "decay_steps", "weight_decay", "grad_clip", "end_learning_rate"):
    if t[name] < 0:
      raise ValueError(f"train.{name}={t[name]} must be >= 0")
  if t.nonfinite not in NONFINITE_POLICIES:
    raise ValueError(
      f"train.nonfinite={t.nonfinite!r} is not known; choose one of: {', '.join(NONFINITE_POLICIES)}"
    )
  if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 1:
    raise ValueError(
      f"checkpoint.every={cfg.checkpoint.every} must be >= 0 and checkpoint.keep="
      f"{cfg.checkpoint.keep} >= 1"
    )
  if cfg.data.seq_len > model.max_seq_len:
    raise ValueError(
      f"data.seq_len={cfg.data.seq_len} is longer than model.max_seq_len={model.max_seq_len}; "
      f"use a sequence length <= {model.max_seq_len} or raise model.max_seq_len"
    )
  if model.kind == "encoder" and cfg.data.objective != "mlm":
    raise ValueError(f"model.kind='encoder' needs data.objective='mlm', got {cfg.data.objective!r}")
  if model.kind == "decoder" and cfg.data.objective != "causal":
    raise ValueError(
      f"model.kind='decoder' needs data.objective='causal', got {cfg.data.objective!r}"
    )
  sizes = mesh_lib.mesh_shape(cfg.parallel, num_devices)
  rules = rules_lib.validate(cfg.parallel, model, sizes)
  for name in objectives.sections_in(cfg):  # A loss-replacing section, e.g. compress.distill.
    objectives.SECTIONS[name].validate(cfg, pipeline=sizes["pipeline"] > 1)
  batch_shards = math.prod(sizes[a] for a in rules_lib.batch_axes(rules))
  micro = cfg.data.batch_size // t.grad_accum_steps
  if cfg.data.batch_size % t.grad_accum_steps:
    raise ValueError(
      f"data.batch_size={cfg.data.batch_size} is not divisible by "
      f"train.grad_accum_steps={t.grad_accum_steps}"
    )
  if micro % batch_shards:
    raise ValueError(
      f"the microbatch of {micro} sequences (data.batch_size / train.grad_accum_steps) does not "
      f"split over {batch_shards} data-parallel devices; use a multiple of {batch_shards}"
    )
  if cfg.parallel.get("offload_opt_state", False) and t.steps_per_call > 1:
    raise ValueError(
      f"parallel.offload_opt_state=True needs train.steps_per_call=1 (got {t.steps_per_call}): "
      "the state moves between host and device once per call"
    )
  if sizes["pipeline"] > 1:
    stages = rules_lib.pipeline_microbatches(cfg.parallel, sizes)
    if micro % (stages * batch_shards):
      raise ValueError(
        f"the microbatch of {micro} sequences does not split into "
        f"parallel.pipeline_microbatches={stages} pipeline microbatches over {batch_shards} "
        f"data-parallel devices; use a multiple of {stages * batch_shards}"
      )
  return model

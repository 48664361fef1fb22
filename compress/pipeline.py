"""Compress a trained run: load, calibrate, apply the rules, evaluate, save, report.

`run(cfg, workdir, out)` is the whole job behind `python -m experiments.compress`. The config
(`get_default_config`):

  rules          list of {path, method, settings} (`compress.rules`)
  order          stages in the order they compose (default prune, lowrank, quantize)
  calibration    `compress.calibration.get_default_config()` (used only if a method needs it)
  eval_batches   validation batches (0 = the run's train.eval_batches)
  best           compress the run's best checkpoint instead of the latest

Report (out/report.json, also returned): stored bytes of the model and of the selected
projections before and after with their ratios; validation loss / bits per byte before and after;
fidelity to the uncompressed model on the same validation tokens (top-1 agreement and the mean
KL(p_float ‖ p_compressed) per token: the survey's loyalty metric); per-module rows with each
stacked layer's relative weight and output error; what whole-model methods recorded (`notes`,
e.g. the units structured pruning removed and its recovery losses); and the largest |Δlogit| after
reloading the written checkpoint (0 when it reloads exactly).
"""

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from reslm import data as data_lib
from reslm.compress import calibration as calib_lib
from reslm.compress import registry
from reslm.compress.checkpoint import COMPRESSED, load_compressed, save_compressed
from reslm.compress.intercept import unfused_projections
from reslm.compress.layers import CompressedLinear
from reslm.compress.rules import apply_plan, make_plan, parse_rules
from reslm.compress.targets import get_module
from reslm.metrics.params import param_bytes
from reslm.models.linear import Linear, ProjectOut
from reslm.training import ownership
from reslm.training.runs import TRAIN_RUN


def get_default_config() -> ml_collections.ConfigDict:
  """A compress config (unlocked; experiment files fill in `rules` and lock it)."""
  cfg = ml_collections.ConfigDict()
  cfg.name = "compress"
  cfg.rules = []
  cfg.order = registry.STAGES
  cfg.calibration = calib_lib.get_default_config()
  cfg.eval_batches = 0
  cfg.best = False
  return cfg


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Every check that needs no model: rules, methods, settings, stages, calibration, eval.

  Raises:
    ValueError: One line naming the first bad setting.
  """
  if not cfg.rules:
    raise ValueError("compress.rules is empty; give at least one {path, method, settings} rule")
  parse_rules(cfg.rules, "compress.rules")
  for stage in cfg.order:
    if stage not in registry.STAGES:
      raise ValueError(f"compress.order has {stage!r}; stages are {', '.join(registry.STAGES)}")
  calib_lib.validate_config(cfg.calibration, "compress.calibration")
  if not isinstance(cfg.eval_batches, int) or cfg.eval_batches < 0:
    raise ValueError(f"compress.eval_batches={cfg.eval_batches!r} must be an integer >= 0")


def fidelity_sums(ref_logits, logits, weights) -> dict[str, jax.Array]:
  """Weighted sums of KL(p_ref ‖ p) and of top-1 agreement over tokens, and the weight."""
  lp = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
  lq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  kl = jnp.maximum(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1), 0.0)  # [b, t]; ≥ 0 up to rounding
  agree = (jnp.argmax(ref_logits, -1) == jnp.argmax(logits, -1)).astype(jnp.float32)
  w = weights.astype(jnp.float32)
  return {"kl": jnp.sum(kl * w), "agree": jnp.sum(agree * w), "weight": jnp.sum(w)}


def _logits_fn(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens).logits


_logits = jax.jit(_logits_fn, static_argnums=0)


def _split(model):
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def _forward_fn(model):
  graphdef, state = nnx.split(model)
  return functools.partial(_logits_fn, graphdef), nnx.to_pure_dict(state)


def evaluate_pair(model, ref_model, batches, bytes_per_token):
  """(ref metrics, model metrics, fidelity of model to ref) in one pass over `batches`.

  Metrics are `training.loop.evaluate`'s (loss, perplexity, accuracy, bits per byte); both models
  run in one compiled step per batch, compressed projections through their own matmuls.
  """
  from reslm.training.loop import evaluate  # Training imports are heavy; only needed here.
  from reslm.training.steps import weighted_losses

  fwd, params = _forward_fn(model)
  ref_fwd, ref_params = _forward_fn(ref_model)

  @jax.jit
  def step(p, rp, batch):
    logits, ref = fwd(p, batch["inputs"]), ref_fwd(rp, batch["inputs"])
    sums = {}
    for name, lg in (("ref", ref), ("model", logits)):
      loss_sum, weight, correct = weighted_losses(lg, batch["targets"], batch["weights"])
      sums[name] = {"loss_sum": loss_sum, "weight": weight, "correct": correct}
    sums["fidelity"] = fidelity_sums(ref, logits, batch["weights"])
    return sums

  with unfused_projections():
    results = [jax.device_get(step(params, ref_params, b)) for b in batches]
  before = evaluate(lambda _, i: results[i]["ref"], None, range(len(batches)), bytes_per_token)
  after = evaluate(lambda _, i: results[i]["model"], None, range(len(batches)), bytes_per_token)
  total = {k: sum(float(r["fidelity"][k]) for r in results) for k in ("kl", "agree", "weight")}
  denom = max(total["weight"], 1.0)
  return before, after, {"top1_agreement": total["agree"] / denom, "kl": total["kl"] / denom}


def _bytes(module) -> int:
  return int(param_bytes(nnx.state(module)))


def output_key(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """What makes two compressions the same (an `--out` may only hold an earlier output of it)."""
  return {
    "source": os.path.abspath(workdir),
    "best": bool(cfg.best),
    "rules": _jsonable(cfg.rules),
    "order": list(cfg.order),
    "calibration": _jsonable(cfg.calibration),
  }


def claim_output(cfg: ml_collections.ConfigDict, workdir: str, out: str) -> None:
  """Refuses (one line) an `out` that is the source run or holds anything but an earlier output
  of this same compression; then marks it. Nothing is read or computed before this."""
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise ValueError(f"--workdir={workdir} holds no run (no config.json); train there first")
  if os.path.realpath(out) == os.path.realpath(workdir):
    raise ValueError(
      f"--out={out} is the run being compressed (--workdir); writing there would replace its "
      "checkpoints; choose another directory"
    )
  ownership.claim(
    out, COMPRESSED, flag="--out", key=output_key(cfg, workdir), others=(TRAIN_RUN, COMPRESSED)
  )


def run(cfg: ml_collections.ConfigDict, workdir: str, out: str) -> dict[str, Any]:
  """Compresses the run in `workdir` by `cfg`, writes the checkpoint and report to `out`."""
  from reslm.training import load_run

  validate_config(cfg)
  claim_output(cfg, workdir, out)
  times = {}
  t0 = time.perf_counter()
  run_cfg, model, meta, step = load_run(workdir, best=cfg.best)
  graphdef, state = nnx.split(model)
  ref_model = nnx.merge(
    graphdef, nnx.to_pure_dict(state)
  )  # Own variables, same (immutable) arrays.
  plan = make_plan(model, cfg.rules, order=cfg.order)
  before = {t.name: _bytes(t.module) for t in plan.targets if t.kind == "linear"}
  times["load"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  dataset = data_lib.build_dataset(run_cfg.data)
  inputs, calib_info, model_data = {}, None, None
  wanted = plan.calibration_targets()
  if wanted or plan.needs_data():
    c = cfg.calibration
    tokens = calib_lib.calibration_tokens(
      run_cfg.data,
      num_sequences=c.num_sequences,
      seq_len=c.seq_len,
      first_step=c.first_step,
      overrides=c.data,
    )
    calib_info = {"sequences": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])}
    if wanted:
      inputs = calib_lib.capture_inputs(
        model, wanted, tokens, batch_size=c.batch_size, max_tokens=c.max_tokens
      )
      calib_info["tokens_per_layer"] = int(next(iter(inputs.values())).shape[1])
    # Whole-model methods (structured pruning) score on the sequences, fine-tune on the run's data.
    model_data = registry.ModelData(tokens, c.batch_size, dataset.train_batch, run_cfg.train)
  times["calibrate"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  result = apply_plan(model, plan, inputs, model_data)
  times["apply"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  batches = dataset.eval_batches(cfg.eval_batches or run_cfg.train.eval_batches)
  ev_before, ev_after, fidelity = evaluate_pair(model, ref_model, batches, dataset.bytes_per_token)
  times["evaluate"] = time.perf_counter() - t0

  sizes = _sizes(ref_model, model, result.layers, before, {t.name: t.path for t in plan.targets})
  os.makedirs(out, exist_ok=True)
  ckpt_meta = {
    # The compressed model's own config: structured pruning changes its shapes.
    "model": model.cfg.to_dict(),
    "tokenizer": meta.get("tokenizer"),
    "compress": {
      "manifest": result.manifest,
      "rules": _jsonable(cfg.rules),
      "order": list(cfg.order),
      "source": {"workdir": os.path.abspath(workdir), "step": int(step), "best": cfg.best},
    },
  }
  t0 = time.perf_counter()
  path = save_compressed(out, model, ckpt_meta, step=int(step))
  reloaded, _ = load_compressed(out)
  probe = jnp.asarray(batches[0]["inputs"])
  with unfused_projections():
    # Equal graphs: one compilation serves both.
    logits = [_logits(*_split(m), probe) for m in (reloaded, model)]
  diff = float(jnp.max(jnp.abs(logits[0] - logits[1])))
  times["save_and_reload"] = time.perf_counter() - t0

  report = {
    "name": cfg.name,
    "source": ckpt_meta["compress"]["source"],
    "checkpoint": path,
    "rules": ckpt_meta["compress"]["rules"],
    "order": list(cfg.order),
    "calibration": calib_info,
    "bytes": sizes,
    "eval": {"before": ev_before, "after": ev_after, **_changes(ev_before, ev_after)},
    "fidelity": fidelity,
    "layers": result.layers,
    "notes": [entry["info"] for entry in result.manifest if "info" in entry],
    "reload_max_abs_logit_diff": diff,
    "seconds": times,
  }
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def _sizes(ref_model, model, rows, before: dict[str, int], paths: dict) -> dict[str, Any]:
  total_before, total_after = _bytes(ref_model), _bytes(model)
  sel_before = sel_after = 0
  for row in rows:
    if row["path"] in before:
      b = before[row["path"]]
      a = _bytes(get_module(model, paths[row["path"]]))
      row["bytes_before"], row["bytes_after"] = b, a
      sel_before, sel_after = sel_before + b, sel_after + a
  return {
    "model_before": total_before,
    "model_after": total_after,
    "model_ratio": total_before / max(total_after, 1),
    "selected_before": sel_before,
    "selected_after": sel_after,
    "selected_ratio": sel_before / max(sel_after, 1),
  }


def _changes(before, after) -> dict[str, float]:
  out = {"loss_change": after["eval_loss"] - before["eval_loss"]}
  out["loss_change_pct"] = 100.0 * out["loss_change"] / max(abs(before["eval_loss"]), 1e-12)
  if "eval_bits_per_byte" in before:
    out["bits_per_byte_change"] = after["eval_bits_per_byte"] - before["eval_bits_per_byte"]
  return out


def _jsonable(value):
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def format_report(report: dict[str, Any]) -> str:
  """A short human-readable summary of a report."""
  b, ev, fi = report["bytes"], report["eval"], report["fidelity"]
  lines = [
    f"model bytes {b['model_before']:,} -> {b['model_after']:,} ({b['model_ratio']:.2f}x); "
    f"selected projections {b['selected_before']:,} -> {b['selected_after']:,} "
    f"({b['selected_ratio']:.2f}x)",
    f"val loss {ev['before']['eval_loss']:.4f} -> {ev['after']['eval_loss']:.4f} "
    f"({ev['loss_change_pct']:+.2f}%)"
    + (
      f"; bits/byte {ev['before']['eval_bits_per_byte']:.4f} -> "
      f"{ev['after']['eval_bits_per_byte']:.4f}"
      if "eval_bits_per_byte" in ev["before"]
      else ""
    ),
    f"fidelity: top-1 agreement {fi['top1_agreement']:.4f}, KL {fi['kl']:.3g} nats/token",
  ]
  lines += [f"  {note['summary']}" for note in report.get("notes", []) if "summary" in note]
  for row in report["layers"]:
    errs = [s.get("output_rel_error", s["weight_rel_error"]) for s in row.get("slices", [])]
    err = f"rel. error {np.mean(errs):.4f}" if errs else ""
    cls = row.get("class", "")
    lines.append(f"  {row['path']:<40} {'+'.join(row['methods']):<16} {cls:<18} {err}")
  lines.append(
    f"checkpoint: {report['checkpoint']} (reload max |Δlogit| "
    f"{report['reload_max_abs_logit_diff']:.2e})"
  )
  return "\n".join(lines)


def zero_fraction(model) -> float:
  """Fraction of exactly-zero weights over the model's projections, float or compressed (what
  pruning leaves, and what a later quantization stage keeps)."""
  zeros = total = 0
  for _, module in nnx.iter_graph(model):
    if isinstance(module, CompressedLinear):
      # Stacked layers hold every layer's arrays: map the one-layer dequantization over them.
      static, k = module.static(), module.in_features
      fn = functools.partial(type(module).weight, static=static, k=k)
      for _ in module.lead:
        fn = jax.vmap(fn)
      w = fn(module.layer_arrays())
    elif isinstance(module, Linear | ProjectOut):
      w = module.kernel[...]
    else:
      continue
    zeros += int(jnp.sum(w == 0))
    total += int(w.size)
  return zeros / max(total, 1)

"""nanoGPT's CPU Shakespeare run, reproduced and compared (foundation benchmark).

  python -m experiments.benchmarks.shakespeare_char [--data=../shared/data/tinyshakespeare.txt]

Trains `experiments/configs/shakespeare_char.py` end to end in this process and reports val loss,
wall time including compile, tokens/s and MFU against the matmul peak measured in the same run,
next to nanoGPT's figures on this machine class (PyTorch, CPU: 94 s for the whole run, val loss
1.886). Writes results/shakespeare_char.json and a PNG of the loss curves.
"""

import json
import os
import sys
import tempfile
import time

_T_START = time.perf_counter()

from absl import app, flags  # noqa: E402

flags.DEFINE_string("data", "../shared/data/tinyshakespeare.txt", "Tiny Shakespeare text file.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Output directory.")
flags.DEFINE_integer("steps_per_call", 10, "Optimizer steps per compiled call.")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (parameters stay float32).")
FLAGS = flags.FLAGS

NANOGPT = {"wall_s": 94.0, "ms_per_iter": 28.0, "val_loss": 1.886}
TARGETS = {"val_loss": 1.89, "wall_s": 0.8 * NANOGPT["wall_s"]}


def main(argv):
  del argv
  if not os.path.exists(FLAGS.data):
    sys.exit(f"error: --data={FLAGS.data} not found; this benchmark needs Tiny Shakespeare")
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  from experiments.configs import shakespeare_char
  from reslm.training import train_and_evaluate

  imports_s = time.perf_counter() - _T_START
  cfg = shakespeare_char.get_config()
  cfg.data.path = FLAGS.data
  cfg.train.steps_per_call = FLAGS.steps_per_call
  cfg.model.dtype = FLAGS.dtype
  cfg.train.progress_bar = False
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    result = train_and_evaluate(cfg, workdir)
    run_s = time.perf_counter() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      log = [json.loads(line) for line in f]
  process_s = time.perf_counter() - _T_START
  rep = result.report
  val = result.eval["eval_loss"]
  row = {
    "val_loss": val,
    "val_bits_per_byte": result.eval.get("eval_bits_per_byte"),
    "run_wall_s": run_s,
    "process_wall_s": process_s,
    "imports_s": imports_s,
    "compile_s": rep["time"]["compile_s"],
    "step_median_ms": rep["time"]["step_median_s"] * 1e3,
    "train_tokens_per_s": rep["throughput"]["train_tokens_per_s"],
    "mfu": rep["mfu"]["mfu"],
    "peak_flops_per_s": rep["mfu"]["peak_flops_per_s"],
    "params": rep["params"]["total"],
    "steps_per_call": FLAGS.steps_per_call,
    "compute_dtype": FLAGS.dtype,
    "energy_j": rep["energy"]["joules"],
    "energy_source": rep["energy"]["source"],
  }
  checks = {
    f"val loss <= {TARGETS['val_loss']}": val <= TARGETS["val_loss"],
    f"process wall <= {TARGETS['wall_s']:.0f} s (0.8 x nanoGPT)": process_s <= TARGETS["wall_s"],
  }
  lines = [
    f"{'':28s}{'this codebase':>16s}{'nanoGPT (CPU)':>16s}",
    f"{'val loss':28s}{val:16.4f}{NANOGPT['val_loss']:16.3f}",
    f"{'wall time, whole process':28s}{process_s:15.1f}s{NANOGPT['wall_s']:15.0f}s",
    f"{'  of which training run':28s}{run_s:15.1f}s",
    f"{'  of which compile':28s}{row['compile_s']:15.2f}s",
    f"{'ms / iteration (median)':28s}{row['step_median_ms']:16.1f}{NANOGPT['ms_per_iter']:16.0f}",
    f"{'train tokens / s':28s}{row['train_tokens_per_s']:16.0f}",
    f"{'MFU vs measured matmul peak':28s}{100 * row['mfu']:15.1f}%",
    f"{'matmul peak (same run)':28s}{row['peak_flops_per_s'] / 1e9:11.1f} GFLOP/s (f32)",
    f"{'compute dtype':28s}{FLAGS.dtype:>16s}{'float32':>16s}",
  ]
  lines += [f"[{'x' if ok else ' '}] {name}" for name, ok in checks.items()]
  print("\n".join(lines))
  os.makedirs(FLAGS.out, exist_ok=True)
  out = {
    "result": row,
    "nanogpt": NANOGPT,
    "targets": TARGETS,
    "checks": checks,
    "eval_curve": [e for e in log if "eval_loss" in e],
    "train_curve": [{"step": e["step"], "loss": e["loss"]} for e in log if "loss" in e],
  }
  stem = "shakespeare_char" + ("" if FLAGS.dtype == "bfloat16" else f"_{FLAGS.dtype}")
  with open(os.path.join(FLAGS.out, f"{stem}.json"), "w") as f:
    json.dump(out, f, indent=2)
  _plot(out, os.path.join(FLAGS.out, f"{stem}.png"))


def _plot(out, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  tr = out["train_curve"]
  ev = out["eval_curve"]
  ax.plot([e["step"] for e in tr], [e["loss"] for e in tr], label="train loss")
  ax.plot([e["step"] for e in ev], [e["eval_loss"] for e in ev], "o-", label="val loss")
  ax.axhline(out["nanogpt"]["val_loss"], color="gray", ls="--", label="nanoGPT val loss")
  ax.set_xlabel("iteration")
  ax.set_ylabel("loss (nats / char)")
  ax.set_title("Tiny Shakespeare, char-level, 4x128")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  app.run(main)

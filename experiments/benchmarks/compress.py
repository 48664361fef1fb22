"""Compression benchmark: every method on one trained Tiny Shakespeare model, quality against bytes.

  taskset -c 1 python -m experiments.benchmarks.compress [--run=<trained run>] \
      [--workdir=/tmp/compress_bench] [--data=../shared/data/tinyshakespeare.txt] [--rows=...]

Trains `experiments/configs/shakespeare_char.py` into --workdir/float (or reuses --run), then for
each row runs the compression pipeline (`compress.pipeline.run`) into --workdir/rows/<name> (a row
whose report is there with the same rules and source is reused, so a rerun resumes) and prints one
table: stored bytes and compression ratio, val loss with its change and bits per byte, fidelity
to the float model (top-1 agreement, KL(p_float ‖ p) per token), the fraction of zero weights,
and greedy decode tokens/s on this CPU with its ratio to the float model (every row timed
round-robin in this run, compressed projections through their own matmuls, per second of process
CPU time: see `decode_timings`). A second table times the int8 x int8 -> int32 matmul
against float32 on the model's projection shapes and on scaled-up widths, for the W8A8 speed claim.
Writes results/compress.json and results/compress.png (val-loss change against stored bytes, the
Pareto front highlighted).

A row is a compress config spec, "<module in experiments/configs/compress>:<variant>", or a
callable (run dir, row dir) -> model for methods outside the pipeline (e.g. distillation, see
`distilled`); adding one is one line in ROWS.
"""

import dataclasses
import importlib
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable

from absl import app, flags

from experiments import cli
from reslm.compress.pipeline import zero_fraction

flags.DEFINE_string("data", "../shared/data/tinyshakespeare.txt", "Tiny Shakespeare text file.")
flags.DEFINE_string("run", None, "A trained shakespeare_char run to reuse (default: train one).")
flags.DEFINE_string("workdir", "/tmp/compress_bench", "Where the float run and row outputs go.")
flags.DEFINE_list("rows", [], "Row names to run (default: all).")
flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "results"), "Output dir.")
flags.DEFINE_integer("prompt_len", 16, "Decode prompt tokens (from the validation text).")
flags.DEFINE_integer("new_tokens", 48, "Greedy tokens generated per decode call.")
flags.DEFINE_integer("decode_repeats", 20, "Timed decode calls per row (median reported).")
flags.DEFINE_list("matmul_m", ["1", "768"], "Matmul rows M: a decode and a prefill batch (12x64).")
flags.DEFINE_list("matmul_widths", ["1024", "2048"], "Scaled-up model widths also timed.")
flags.DEFINE_integer("matmul_repeats", 7, "Timed rounds per matmul shape (median reported).")
flags.DEFINE_bool("smoke", False, "Tiny model, a few steps, three rows (seconds; for tests).")


@dataclasses.dataclass(frozen=True)
class Row:
  """One method and setting.

  Attributes:
    name: Row label (and its directory under --workdir/rows).
    spec: "<module in experiments/configs/compress>:<variant>", run by `compress.pipeline`.
    make: Instead of `spec`: (float run dir, row dir) -> model, for methods that are not rules
      (distillation trains a student). It should resume from what it left in the row dir.
  """

  name: str
  spec: str | None = None
  make: Callable[[str, str], object] | None = None


def _float_model(run_dir: str, row_dir: str):
  from reslm.training import load_run

  del row_dir
  return load_run(run_dir)[1]


def distilled(variant: str) -> Callable[[str, str], object]:
  """A row maker: trains `experiments/configs/distill.py:<variant>` from the float run (resumes)."""

  def make(run_dir: str, row_dir: str):
    from experiments.configs import distill
    from reslm.training import load_run, train_and_evaluate

    teacher_cfg = load_run(run_dir)[0]
    cfg = distill.get_config(variant)
    if "distill" in cfg:
      cfg.distill.teacher_workdir = os.path.abspath(run_dir)
    cfg.data.path = teacher_cfg.data.path
    cfg.train.progress_bar = False
    train_and_evaluate(cfg, row_dir)
    return load_run(row_dir)[1]

  return make


ROWS = (
  Row("float", make=_float_model),
  Row("rtn_int8", "quantize:int8"),
  Row("rtn_int4_g64", "quantize:int4"),
  Row("gptq_int4_g64", "quantize:gptq4"),
  Row("nf4_b64", "quantize:nf4"),
  Row("awq_int4_g64", "quantize:awq4"),
  Row("smoothquant_w8a8", "quantize:w8a8"),
  Row("llm_int8", "quantize:llm_int8"),
  Row("magnitude50", "prune:magnitude50"),
  Row("wanda50", "prune:wanda50"),
  Row("sparsegpt50", "prune:sparsegpt50"),
  Row("wanda_2_4", "prune:wanda_2_4"),
  Row("svd_energy90", "prune:svd_energy90"),
  Row("svd_p60", "prune:svd_p60"),
  Row("svd_llm_p60", "prune:svd_llm_p60"),
  Row("asvd_p60", "prune:asvd_p60"),
  Row("asvd_uniform_p60", "prune:asvd_uniform_p60"),
  Row("sparsegpt_2_4_int8", "prune:sparsegpt_2_4_int8"),
  Row("sparsegpt_2_4_gptq4", "prune:sparsegpt_2_4_gptq4"),
  Row("heads25", "structured:heads25"),
  Row("neurons25", "structured:neurons25"),
  Row("heads25_neurons25", "structured:heads25_neurons25"),
  Row("heads25_neurons25_recover", "structured:heads25_neurons25_recover"),
  Row("heads25_neurons25_int8", "structured:heads25_neurons25_int8"),
  Row("distill_white_box", make=distilled("white_box")),
  Row("student_scratch", make=distilled("scratch")),
)
SMOKE_ROWS = ("float", "rtn_int8", "magnitude50")
COLUMNS = (
  "method",
  "spec",
  "stored_bytes",
  "ratio",
  "val_loss",
  "loss_change_pct",
  "bits_per_byte",
  "top1_agreement",
  "kl",
  "zero_fraction",
  "decode_tokens_per_s",
  "decode_ratio",
  "greedy_match",
)


def compress_config(spec: str, *, smoke: bool):
  """The pipeline config a spec names; smoke: 4 calibration sequences and 2 eval batches."""
  module, _, variant = spec.partition(":")
  cfg = importlib.import_module(f"experiments.configs.compress.{module}").get_config(
    variant or None
  )
  if smoke:
    cfg.calibration.update(num_sequences=4, batch_size=4, max_tokens=256)
    cfg.eval_batches = 2
  return cfg


def _plain(value):
  """JSON round trip (ConfigDicts as dicts), to compare rules with a stored report's."""
  return json.loads(json.dumps(value, default=lambda o: o.to_dict()))


def run_spec_row(spec: str, run_dir: str, row_dir: str, *, smoke: bool):
  """(report, compressed model); reuses row_dir's report when rules and source match."""
  from reslm.compress import load_compressed, pipeline

  cfg = compress_config(spec, smoke=smoke)
  path = os.path.join(row_dir, "report.json")
  if os.path.exists(path):
    with open(path) as f:
      report = json.load(f)
    if report["rules"] == _plain(cfg.rules) and report["source"]["workdir"] == os.path.abspath(
      run_dir
    ):
      return report, load_compressed(row_dir)[0]
    # A stale row of this benchmark (its --workdir is claimed): compress refuses to overwrite
    # another compression's output, so the benchmark removes its own first.
    shutil.rmtree(row_dir)
  report = pipeline.run(cfg, run_dir, row_dir)
  return report, load_compressed(row_dir)[0]


def evaluate_model(model, ref_model, run_cfg, eval_batches: int) -> dict:
  """A pipeline-shaped report (bytes, eval, fidelity) for a model the pipeline did not build."""
  from flax import nnx

  from reslm import data as data_lib
  from reslm.compress import pipeline
  from reslm.metrics.params import param_bytes

  dataset = data_lib.build_dataset(run_cfg.data)
  batches = dataset.eval_batches(eval_batches or run_cfg.train.eval_batches)
  before, after, fidelity = pipeline.evaluate_pair(
    model, ref_model, batches, dataset.bytes_per_token
  )
  b0, b1 = param_bytes(nnx.state(ref_model)), param_bytes(nnx.state(model))
  change = after["eval_loss"] - before["eval_loss"]
  return {
    "bytes": {"model_before": b0, "model_after": b1, "model_ratio": b0 / max(b1, 1)},
    "eval": {
      "before": before,
      "after": after,
      "loss_change": change,
      "loss_change_pct": 100.0 * change / abs(before["eval_loss"]),
    },
    "fidelity": fidelity,
  }


def decode_timings(models: dict, prompt, new_tokens: int, repeats: int) -> dict:
  """Greedy decode of `new_tokens` after `prompt` for every model, timed round-robin.

  Returns:
    {name: {"seconds": median process CPU seconds per call, "wall_min_s": fastest wall time,
    "tokens": generated ids}}. Compressed projections run through their own matmuls
    (`unfused_projections`). CPU time, not wall time: on a core shared with other jobs the wall
    time mostly measures the neighbours (identical programs differ by ~30% in wall time and ~2%
    in CPU time here); pinned to one core (taskset) the process's CPU time is the work done.
  """
  import jax
  import numpy as np
  from flax import nnx

  from reslm.compress import unfused_projections
  from reslm.inference import generate

  compiled = {}
  with unfused_projections():
    for name, model in models.items():
      graphdef, state = nnx.split(model)

      def gen(state, prompt, graphdef=graphdef):
        m = nnx.merge(graphdef, state)
        return generate(m, prompt, max_new_tokens=new_tokens, rng=jax.random.key(0), temperature=0)

      fn = jax.jit(gen).lower(state, prompt).compile()
      compiled[name] = (fn, state, np.asarray(fn(state, prompt))[0, prompt.shape[1] :])
  cpu, wall = {name: [] for name in compiled}, {name: [] for name in compiled}
  for _ in range(repeats):
    for name, (fn, state, _) in compiled.items():
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(state, prompt))
      cpu[name].append(time.process_time() - c0)
      wall[name].append(time.perf_counter() - t0)
  return {
    name: {
      "seconds": float(np.median(cpu[name])),
      "wall_min_s": float(min(wall[name])),
      "tokens": compiled[name][2],
    }
    for name in compiled
  }


def _time_calls(fns: dict, repeats: int) -> dict:
  """Seconds per call: median process CPU time per round (see `decode_timings`), fastest wall.

  Each round times a burst of calls long enough (~2 ms) to beat the timers' resolution.
  """
  import jax
  import numpy as np

  bursts = {}
  for name, (fn, args) in fns.items():
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    bursts[name] = max(1, min(1000, int(2e-3 / max(time.perf_counter() - t0, 1e-7))))
  cpu, wall = {name: [] for name in fns}, {name: [] for name in fns}
  for _ in range(repeats):
    for name, (fn, args) in fns.items():
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(bursts[name]):
        out = fn(*args)
      jax.block_until_ready(out)
      cpu[name].append((time.process_time() - c0) / bursts[name])
      wall[name].append((time.perf_counter() - t0) / bursts[name])
  return {
    name: {"cpu_s": float(np.median(cpu[name])), "wall_min_s": float(min(wall[name]))}
    for name in fns
  }


def matmul_row(m: int, k: int, n: int, repeats: int) -> dict:
  """f32, bf16, int8 x int8 -> int32 and the whole W8A8 layer on one [M, K] x [K, N] problem."""
  import numpy as np

  from experiments.benchmarks.quant_matmul import matmul_variants

  fns = matmul_variants(m, k, n)
  x_q, w_q = fns["int8"][1]
  got = np.asarray(fns["int8"][0](x_q, w_q))[:4, :8]  # The int8 dot must be exact.
  want = np.asarray(x_q[:4], np.int64) @ np.asarray(w_q[:, :8], np.int64)
  np.testing.assert_array_equal(got, want)
  times = _time_calls(fns, repeats)
  secs = {name: t["cpu_s"] for name, t in times.items()}
  return {
    "m": m,
    "k": k,
    "n": n,
    "seconds": secs,
    "wall_min_seconds": {name: t["wall_min_s"] for name, t in times.items()},
    "speedup_vs_f32": {v: secs["f32"] / secs[v] for v in ("bf16", "int8", "w8a8")},
  }


def projection_shapes(model) -> list[tuple[int, int, str]]:
  """Distinct (K, N) of the model's projections, with the paths' last parts."""
  from reslm.compress.targets import find_targets

  shapes: dict[tuple[int, int], list[str]] = {}
  for t in find_targets(model):
    if t.kind == "linear":
      k, n = math.prod(t.in_shape), math.prod(t.out_shape)
      shapes.setdefault((k, n), []).append(t.name.split("/")[-1])
  return [(k, n, "+".join(sorted(set(names)))) for (k, n), names in shapes.items()]


def scaled_shapes(width: int) -> list[tuple[int, int, str]]:
  """A width-`width` block's projections (attention d x d, SwiGLU d x 8d/3 and back)."""
  hidden = int(8 * width / 3)
  return [(width, width, f"d={width} q/k/v/o"), (width, hidden, "gate/up"), (hidden, width, "down")]


def front_names(rows: list[dict]) -> list[str]:
  """The Pareto front of val loss against stored bytes (`metrics.pareto_front`)."""
  from reslm.metrics import pareto_front

  idx = pareto_front(
    [r["stored_bytes"] for r in rows],
    [r["val_loss"] for r in rows],
    higher_quality_is_better=False,
  )
  return [rows[i]["method"] for i in idx]


def table_row(row: Row, report: dict, model) -> dict:
  ev, fi, b = report["eval"], report["fidelity"], report["bytes"]
  return {
    "method": row.name,
    "spec": row.spec,
    "stored_bytes": int(b["model_after"]),
    "ratio": float(b["model_ratio"]),
    "val_loss": float(ev["after"]["eval_loss"]),
    "loss_change_pct": float(ev["loss_change_pct"]),
    "bits_per_byte": ev["after"].get("eval_bits_per_byte"),
    "top1_agreement": float(fi["top1_agreement"]),
    "kl": float(fi["kl"]),
    "zero_fraction": zero_fraction(model),
  }


def train_float(workdir: str, data: str, smoke: bool) -> str:
  from experiments.configs import shakespeare_char
  from reslm.training import train_and_evaluate

  cfg = shakespeare_char.get_config("smoke" if smoke else None)
  cfg.data.path = data
  cfg.train.progress_bar = False
  if smoke:  # Seconds matter in tests: one checkpoint, no MFU peak measurement.
    cfg.checkpoint.every = cfg.train.steps
    cfg.report.measure_peak = False
  run_dir = os.path.join(workdir, "float")
  train_and_evaluate(cfg, run_dir)
  return run_dir


def benchmark(
  run_dir: str, rows: tuple[Row, ...], workdir: str, results: str, *, smoke: bool
) -> dict:
  """Runs every row, times decode and the matmuls, writes compress.json / .png into `results`."""
  import jax.numpy as jnp

  from reslm import data as data_lib
  from reslm.training import load_run

  run_cfg, ref_model, _, _ = load_run(run_dir)
  eval_batches = 2 if smoke else 0
  table, models = [], {}
  for row in rows:
    row_dir = os.path.join(workdir, "rows", row.name)
    t0 = time.perf_counter()
    if row.spec is not None:
      report, model = run_spec_row(row.spec, run_dir, row_dir, smoke=smoke)
    else:
      model = row.make(run_dir, row_dir)
      report = evaluate_model(model, ref_model, run_cfg, eval_batches)
    models[row.name] = model
    table.append(table_row(row, report, model))
    r = table[-1]
    print(
      f"{row.name}: {r['stored_bytes']:,} B, val loss {r['val_loss']:.4f} "
      f"({r['loss_change_pct']:+.2f}%), top-1 {r['top1_agreement']:.4f} "
      f"[{time.perf_counter() - t0:.0f} s]",
      flush=True,
    )

  dataset = data_lib.build_dataset(run_cfg.data)
  prompt = jnp.asarray(dataset.eval_batches(1)[0]["inputs"][:1, : FLAGS.prompt_len], jnp.int32)
  new_tokens = min(FLAGS.new_tokens, ref_model.cfg.max_seq_len - prompt.shape[1])
  decode = decode_timings(models, prompt, new_tokens, 3 if smoke else FLAGS.decode_repeats)
  base = table[0]["method"]
  for r in table:
    d = decode[r["method"]]
    r["decode_tokens_per_s"] = new_tokens / d["seconds"]
    r["decode_ratio"] = decode[base]["seconds"] / d["seconds"]
    r["decode_wall_min_s"] = d["wall_min_s"]
    r["greedy_match"] = float((d["tokens"] == decode[base]["tokens"]).mean())
  front = front_names(table)

  ms = [int(m) for m in FLAGS.matmul_m]
  shapes = projection_shapes(ref_model)
  if not smoke:
    shapes += [s for w in FLAGS.matmul_widths for s in scaled_shapes(int(w))]
  matmuls = []
  for k, n, what in shapes:
    for m in ms:
      matmuls.append({"what": what, **matmul_row(m, k, n, 2 if smoke else FLAGS.matmul_repeats)})

  print_tables(table, front, matmuls, new_tokens, prompt.shape[1], base)
  import jax

  out = {
    "setup": {
      "run": os.path.abspath(run_dir),
      "model": {k: run_cfg.model[k] for k in ("d_model", "num_layers", "num_heads", "dtype")},
      "float_val_loss": table[0]["val_loss"],
      "decode": {"prompt_tokens": int(prompt.shape[1]), "new_tokens": new_tokens, "greedy": True},
      "jax": jax.__version__,
      "cpu": platform.processor() or platform.machine(),
      "load_average_at_end": os.getloadavg(),
      "smoke": smoke,
      "timing": "round-robin over rows / variants; median process CPU seconds (fastest wall "
      "time kept too); pinned to one core shared with other jobs",
    },
    "columns": list(COLUMNS),
    "rows": table,
    "pareto_front": front,
    "matmul": matmuls,
  }
  os.makedirs(results, exist_ok=True)
  with open(os.path.join(results, "compress.json"), "w") as f:
    json.dump(out, f, indent=2)
  plot(table, front, os.path.join(results, "compress.png"))
  return out


def print_tables(table, front, matmuls, new_tokens, prompt_len, base):
  print(
    f"\n{'method':20s}{'bytes':>11s}{'ratio':>7s}{'val loss':>10s}{'Δ%':>8s}{'bits/B':>8s}"
    f"{'top-1':>8s}{'KL':>9s}{'zeros':>7s}{'tok/s':>8s}{'x' + base:>9s}{'greedy=':>8s}"
  )
  for r in table:
    mark = "*" if r["method"] in front else " "
    bpb = r["bits_per_byte"]
    print(
      f"{mark}{r['method']:19s}{r['stored_bytes']:11,d}{r['ratio']:7.2f}{r['val_loss']:10.4f}"
      f"{r['loss_change_pct']:+8.2f}{bpb if bpb is not None else float('nan'):8.4f}"
      f"{r['top1_agreement']:8.4f}{r['kl']:9.2e}{r['zero_fraction']:7.2f}"
      f"{r['decode_tokens_per_s']:8.0f}{r['decode_ratio']:9.2f}{r['greedy_match']:8.2f}"
    )
  print(
    f"* Pareto front (val loss vs stored bytes). Decode: greedy, {prompt_len}-token prompt, "
    f"{new_tokens} new tokens, batch 1, tokens per CPU-second; greedy= is the fraction of "
    f"generated positions equal to {base}'s."
  )
  print(
    f"\n{'projection':22s}{'M x K x N':>18s}{'f32 µs':>10s}{'bf16':>7s}{'int8':>7s}{'w8a8':>7s}"
    "   (speed-up over f32; process CPU time per call)"
  )
  for r in matmuls:
    s = r["speedup_vs_f32"]
    print(
      f"{r['what'][:22]:22s}{r['m']:>6d}x{r['k']:>5d}x{r['n']:>5d}"
      f"{r['seconds']['f32'] * 1e6:10.1f}{s['bf16']:7.2f}{s['int8']:7.2f}{s['w8a8']:7.2f}"
    )


def plot(table, front, path):
  """Val-loss change (symlog: 0.1% and 10% both readable) against stored bytes (log)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(9, 5.5))
  on = [r for r in table if r["method"] in front]
  off = [r for r in table if r["method"] not in front]
  kib = lambda rs: [r["stored_bytes"] / 1024 for r in rs]  # noqa: E731
  pct = lambda rs: [r["loss_change_pct"] for r in rs]  # noqa: E731
  ax.scatter(kib(off), pct(off), c="tab:gray", label="dominated")
  ax.plot(kib(on), pct(on), "o-", c="tab:red", label="Pareto front (val loss vs bytes)")
  ax.axhline(0.0, ls="--", c="tab:blue", lw=0.8, label=f"{table[0]['method']} val loss")
  # Neighbours in bytes get labels at alternating heights so they do not overprint.
  for i, r in enumerate(sorted(table, key=lambda r: r["stored_bytes"])):
    ax.annotate(
      r["method"],
      (r["stored_bytes"] / 1024, r["loss_change_pct"]),
      fontsize=7,
      xytext=(4, (6, -10, 14, -18)[i % 4]),
      textcoords="offset points",
    )
  ax.set_xscale("log")
  ax.set_yscale("symlog", linthresh=0.1)
  ax.set(
    xlabel="stored bytes (KiB, log)",
    ylabel="val loss change vs float (%, symlog)",
    title=f"Compressing a Tiny Shakespeare char model (float val loss {table[0]['val_loss']:.4f})",
  )
  worst = max(r["loss_change_pct"] for r in table)
  ax.set_ylim(top=3 * max(worst, 0.1))  # Room for the top row's label.
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def select_rows(names, smoke: bool) -> tuple[Row, ...]:
  known = {r.name: r for r in ROWS}
  names = list(names) or list(SMOKE_ROWS if smoke else known)
  for name in names:
    if name not in known:
      raise ValueError(f"--rows has {name!r}; rows are {', '.join(known)}")
  rows = tuple(known[n] for n in names)
  if rows[0].name != "float":
    rows = (known["float"], *rows)  # Ratios and the decode baseline need the float model first.
  return rows


FLAGS = flags.FLAGS


def _workdir_kind():
  from reslm.training.ownership import Kind

  return Kind(
    command="experiments.benchmarks.compress",
    what="a compression benchmark's runs",
    outputs=("float/", "rows/"),
  )


@cli.one_line_errors
def main(argv):
  del argv
  rows = select_rows(FLAGS.rows, FLAGS.smoke)
  from reslm.training import ownership

  # The float run and the rows live under --workdir: never write into someone else's directory.
  ownership.claim(FLAGS.workdir, _workdir_kind(), flag="--workdir")
  run_dir = FLAGS.run
  if run_dir is None:
    if not os.path.exists(FLAGS.data):
      sys.exit(f"error: --data={FLAGS.data} not found; this benchmark trains on Tiny Shakespeare")
    run_dir = train_float(FLAGS.workdir, FLAGS.data, FLAGS.smoke)
  benchmark(run_dir, rows, FLAGS.workdir, FLAGS.results, smoke=FLAGS.smoke)


if __name__ == "__main__":
  app.run(main)

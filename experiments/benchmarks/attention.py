"""Attention variants side by side: compiled memory, FLOPs and wall time against sequence length.

  python -m experiments.benchmarks.attention [--variants=dense,flash,...] [--lengths=512,...,16384]

For each registered attention variant and each T, the forward+backward of the attention core
(queries/keys/values -> output, causal, batch 1, 4 heads, head_dim 64, float32 — the shape of the
peer figures in the attention issue) is compiled and measured:
  - temp bytes from `memory_analysis()` (deterministic; no execution needed, so even dense at
    T=16384 is "measured" by its compiled buffer plan),
  - FLOPs from `cost_analysis()` (XLA counts a loop body once: chunked/scanned variants are
    under-counted; the table flags them),
  - wall time, the fastest of `--repeats` runs after warm-up (on a shared machine noise only adds
    time, so the minimum is the steadiest estimate; the median is kept too), only where the temp
    memory fits `--max_run_gib`.
Scaling exponents are fitted on log-log over T >= `--fit_from`. Writes results/attention.json and
results/attention.png (`--name` changes the stem; a run with `--variants` updates those rows of
an existing file and keeps the rest). tokamax's `xla_chunked` attention is added as a row when
tokamax is installed (`pip install -r requirements-bench.txt`). Mixers that are not attention
shells (mamba, rwkv, ...) are measured as whole layers on the block input.
"""

import json
import os
import time

from absl import app, flags

flags.DEFINE_list("variants", [], "Variant names (default: every registered attention mixer).")
flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096", "8192", "16384"], "Sequence lengths.")
flags.DEFINE_integer("heads", 4, "Attention heads (keys/values use as many).")
flags.DEFINE_integer("head_dim", 64, "Head width.")
flags.DEFINE_integer("fit_from", 2048, "Fit scaling exponents on T >= this.")
flags.DEFINE_float("max_run_gib", 2.0, "Only time runs whose compiled temp memory is below this.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (minimum and median reported).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Output directory.")
flags.DEFINE_string("name", "attention", "Output file stem (<out>/<name>.json and .png).")
flags.DEFINE_bool(
  "whole_layer", False, "Measure every mixer as a whole layer (projections included) on its input."
)
flags.DEFINE_bool("tokamax", True, "Add tokamax's xla_chunked row when tokamax is installed.")
FLAGS = flags.FLAGS

# Settings that make each variant comparable at long T (defaults otherwise).
OPTIONS = {"sliding_window": {"window": 256}, "aft": {"variant": "simple"}}


def _core_fn(name: str, t: int):
  """The loss-free forward+backward of one variant's core: (q, k, v, cot) -> grads."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from reslm.models import MIXERS, ModelConfig

  h, d = FLAGS.heads, FLAGS.head_dim
  cfg = ModelConfig(
    vocab_size=8,
    d_model=h * d,
    num_layers=1,
    num_heads=h,
    max_seq_len=t,
    mixer=name,
    mixer_options=OPTIONS.get(name, {}),
  )
  layer = MIXERS.build(name, cfg, causal=True, rngs=nnx.Rngs(0))
  mix = None if FLAGS.whole_layer else getattr(layer, "mix", None)
  if mix is None:  # Not an `Attention` shell: measure the whole layer on its input.

    def fwd(x):
      pos = jnp.arange(t)[None]
      return layer(x, positions_bt=pos)[0]

    shapes = [(1, t, h * d)]
  else:

    def fwd(q, k, v):
      return mix(q, k, v)[0]

    shapes = [(1, t, h, d)] * 3

  def fwd_bwd(*args):
    *inputs, cot = args
    out, vjp = jax.vjp(fwd, *inputs)
    return out, vjp(cot)

  out_shape = (1, t, h * d) if mix is None else (1, t, h, d)
  specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [*shapes, out_shape]]
  return jax.jit(fwd_bwd), specs


def _tokamax_fn(t: int):
  import jax
  import jax.numpy as jnp
  import tokamax  # noqa: F401  (optional peer)

  def fwd(q, k, v):
    return tokamax.dot_product_attention(q, k, v, is_causal=True, implementation="xla_chunked")

  def fwd_bwd(q, k, v, cot):
    out, vjp = jax.vjp(fwd, q, k, v)
    return out, vjp(cot)

  shape = (1, t, FLAGS.heads, FLAGS.head_dim)
  return jax.jit(fwd_bwd), [jax.ShapeDtypeStruct(shape, jnp.float32)] * 4


def _measure(fn, specs):
  import jax
  import numpy as np

  from reslm.metrics import memory_analysis, xla_cost

  t0 = time.perf_counter()
  compiled = fn.lower(*specs).compile()
  row = {"compile_s": time.perf_counter() - t0}
  mem = memory_analysis(compiled)
  row["temp_bytes"] = mem["temp_bytes"]
  row["flops"] = xla_cost(compiled)["flops"]
  row["has_loops"] = "while" in compiled.as_text()
  row["time_s"] = None
  if mem["temp_bytes"] is not None and mem["temp_bytes"] < FLAGS.max_run_gib * 2**30:
    keys = jax.random.split(jax.random.key(0), len(specs))
    args = [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, specs, strict=True)]
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(FLAGS.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t0)
    row["time_s"] = float(np.min(times))
    row["time_median_s"] = float(np.median(times))
  return row


def _describe(row) -> str:
  if "error" in row:
    return row["error"]
  timing = "-" if row["time_s"] is None else f"{row['time_s'] * 1e3:.1f} ms"
  return (
    f"temp {row['temp_bytes'] / 2**20:10.1f} MiB  flops {row['flops'] or 0:10.3g}  time {timing}"
  )


def _exponent(lengths, values, fit_from):
  import numpy as np

  pts = [(t, v) for t, v in zip(lengths, values, strict=True) if t >= fit_from and v]
  if len(pts) < 2:
    return None
  x = np.log([p[0] for p in pts])
  y = np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def main(argv):
  del argv
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  import reslm.models  # noqa: F401  (registers every variant)
  from reslm.models import MIXERS

  lengths = [int(t) for t in FLAGS.lengths]
  names = FLAGS.variants or MIXERS.names()
  makers = {name: (lambda t, n=name: _core_fn(n, t)) for name in names}
  if FLAGS.tokamax:
    try:
      import tokamax  # noqa: F401

      makers["tokamax_xla_chunked"] = _tokamax_fn
    except ImportError:
      print("tokamax not installed (requirements-bench.txt): no tokamax xla_chunked row")
  json_path = os.path.join(FLAGS.out, f"{FLAGS.name}.json")
  results = {}
  if FLAGS.variants and os.path.exists(json_path):
    # A partial rerun updates its rows and keeps the others (same shape only).
    with open(json_path) as f:
      previous = json.load(f)
    if (
      previous["shape"]["heads"] == FLAGS.heads and previous["shape"]["head_dim"] == FLAGS.head_dim
    ):
      results = previous["results"]
  for name, make in makers.items():
    rows = []
    for t in lengths:
      try:
        row = _measure(*make(t))
      except Exception as e:  # A variant that cannot run this length: record why.
        row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
      row["T"] = t
      rows.append(row)
      print(f"{name:22s} T={t:6d} {_describe(row)}", flush=True)
    fit = {
      key: _exponent(lengths, [r.get(key) for r in rows], FLAGS.fit_from)
      for key in ("temp_bytes", "flops", "time_s")
    }
    results[name] = {"rows": rows, "exponents": fit}
  _table(results, lengths)
  os.makedirs(FLAGS.out, exist_ok=True)
  shape = {
    "batch": 1,
    "heads": FLAGS.heads,
    "head_dim": FLAGS.head_dim,
    "dtype": "float32",
    "causal": True,
    "options": OPTIONS,
  }
  with open(json_path, "w") as f:
    json.dump({"shape": shape, "results": results}, f, indent=2)
  _plot(results, os.path.join(FLAGS.out, f"{FLAGS.name}.png"))


def _table(results, lengths):
  t_max = max(lengths)
  print(
    f"\n{'variant':22s}{'MiB @ T=' + str(t_max):>16s}{'mem exp':>9s}{'flop exp':>9s}{'time exp':>9s}"
  )
  for name, res in results.items():
    last = res["rows"][-1]
    mem = f"{last['temp_bytes'] / 2**20:.0f}" if last.get("temp_bytes") is not None else "-"
    exps = [res["exponents"][k] for k in ("temp_bytes", "flops", "time_s")]
    loops = any(r.get("has_loops") for r in res["rows"])
    cells = "".join(f"{e:9.2f}" if e is not None else f"{'-':>9s}" for e in exps)
    print(f"{name:22s}{mem:>16s}{cells}" + ("  (loops: XLA FLOPs undercount)" if loops else ""))


def _plot(results, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, res in results.items():
    ts = [r["T"] for r in res["rows"] if r.get("temp_bytes")]
    axes[0].loglog(
      ts, [r["temp_bytes"] / 2**20 for r in res["rows"] if r.get("temp_bytes")], "o-", label=name
    )
    tt = [r["T"] for r in res["rows"] if r.get("time_s")]
    if tt:
      axes[1].loglog(
        tt, [r["time_s"] * 1e3 for r in res["rows"] if r.get("time_s")], "o-", label=name
      )
  axes[0].set(
    xlabel="sequence length T", ylabel="compiled temp memory (MiB), fwd+bwd", title="memory"
  )
  axes[1].set(xlabel="sequence length T", ylabel="wall time (ms), fwd+bwd", title="time (CPU)")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  app.run(main)

"""Decode cost per generated token against context length, for every mixer with a decoding state.

  python -m experiments.benchmarks.decode [--mixers=dense,mamba,rwkv] [--contexts=1024,...,16384]
  python -m experiments.benchmarks.decode --mixers=dense:int8,dense:int8_whole  # int8 KV cache

For each mixer and context length L a one-layer decoder LM (width 256, 4 heads, float32) holds a
decoding state sized for L + 1 tokens and generates the token at position L. Per step it reports
  - XLA `cost_analysis()` FLOPs and bytes accessed of the compiled one-token step (deterministic),
  - the state's size in bytes (a KV cache grows with L; a recurrent state does not),
  - wall time per token: median over `--steps` steps, the contexts of a mixer timed round-robin so
    machine noise hits them alike (the state buffer is donated, so a constant-size state is
    updated in place rather than copied).
Ratios are against the shortest context of the same mixer, measured in the same run. Writes
results/decode.json and results/decode.png; a run with `--mixers` updates those mixers' rows.

`<mixer>:int8` decodes with the int8 KV cache (compress's kv_int8 rule), attended from its codes
(`models.attention.base.int8_attention`); `<mixer>:int8_whole` is the path it replaced, which
dequantises the whole cache to float every step before attending (kept as a baseline by setting
`softmax_decode = False` on the mixers).
"""

import json
import os
import time

from absl import app, flags

flags.DEFINE_list(
  "mixers",
  ["dense", "flash", "sliding_window", "linear", "mamba", "rwkv", "hyena", "monarch"],
  "Sequence mixers (unregistered names are skipped with a note).",
)
flags.DEFINE_list("contexts", ["1024", "2048", "4096", "8192", "16384"], "Context lengths L.")
flags.DEFINE_integer("d_model", 256, "Model width.")
flags.DEFINE_integer("heads", 4, "Heads.")
flags.DEFINE_integer("steps", 30, "Timed decode steps per point (median reported).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Output directory.")
FLAGS = flags.FLAGS

OPTIONS = {"sliding_window": {"window": 256}}
KV_MODES = ("", "int8", "int8_whole")  # After a colon in --mixers: the KV cache's storage.


def _step_fn(mixer: str, context: int):
  """A jitted one-token decode step at position `context` and its inputs."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from reslm.models import ModelConfig, build_model

  mixer, _, kv = mixer.partition(":")
  cfg = ModelConfig(
    vocab_size=256,
    d_model=FLAGS.d_model,
    num_layers=1,
    num_heads=FLAGS.heads,
    max_seq_len=context + 1,
    mixer=mixer,
    mixer_options=OPTIONS.get(mixer, {}),
  )
  model = build_model(cfg)
  if kv:
    _int8_kv(model, whole=kv == "int8_whole")
  graphdef, state = nnx.split(model)
  cache = model.init_cache(1, context + 1)

  def step(state, cache, token, index):
    out = nnx.merge(graphdef, state)(token, cache=cache, cache_index=index)
    return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)[:, None], out.cache

  fn = jax.jit(step, donate_argnums=1)
  return fn, (state, cache, jnp.zeros((1, 1), jnp.int32), jnp.int32(context))


def _int8_kv(model, *, whole: bool):
  """The int8 KV cache on every mixer; `whole`: dequantise it whole each step (the old path)."""
  from reslm.compress import apply_rules

  apply_rules(model, [{"path": r".*/mixer", "method": "kv_int8"}])
  if whole:
    for block in model.layers.groups.blocks:
      block.mixer.softmax_decode = False


def _compile(mixer: str, context: int):
  """(row with the deterministic figures, a stateful one-token step callable)."""
  import jax

  from reslm.metrics import param_bytes, xla_cost

  fn, (state, cache, token, index) = _step_fn(mixer, context)
  compiled = fn.lower(state, cache, token, index).compile()
  cost = xla_cost(compiled)
  row = {
    "L": context,
    "state_bytes": param_bytes(cache),
    "flops": cost["flops"],
    "bytes_accessed": cost["bytes_accessed"],
  }
  carry = {"token": token, "cache": cache}

  def step():
    # The same position each time: the cost of the L-th token, not of a growing context.
    carry["token"], carry["cache"] = jax.block_until_ready(
      compiled(state, carry["cache"], carry["token"], index)
    )

  step()  # Warm-up.
  return row, step


def _measure_all(mixer: str, contexts) -> list[dict]:
  """Rows for every context; timed round-robin so machine noise hits all contexts alike."""
  import numpy as np

  rows, steps = [], {}
  for context in contexts:
    try:
      row, steps[context] = _compile(mixer, context)
    except Exception as e:  # A mixer that cannot decode at this length: record why.
      row = {"L": context, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    rows.append(row)
  times = {c: [] for c in steps}
  for _ in range(FLAGS.steps):
    for context, step in steps.items():
      t0 = time.perf_counter()
      step()
      times[context].append(time.perf_counter() - t0)
  for row in rows:
    if row["L"] in times:
      row["time_s"] = float(np.median(times[row["L"]]))
  return rows


def main(argv):
  del argv
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  import reslm.models  # noqa: F401  (registers every mixer)
  from reslm.models import MIXERS

  contexts = sorted(int(c) for c in FLAGS.contexts)
  json_path = os.path.join(FLAGS.out, "decode.json")
  results = {}
  if FLAGS["mixers"].present and os.path.exists(json_path):
    with open(json_path) as f:  # A partial rerun updates its mixers and keeps the others.
      results = json.load(f)["results"]
  for mixer in FLAGS.mixers:
    if mixer.partition(":")[0] not in MIXERS or mixer.partition(":")[2] not in KV_MODES:
      print(f"{mixer}: not a registered mixer (with an optional :int8 / :int8_whole), skipped")
      continue
    rows = _measure_all(mixer, contexts)
    for row in rows:
      print(f"{mixer:16s} L={row['L']:6d} {_describe(row)}", flush=True)
    results[mixer] = {"rows": rows, "ratios": _ratios(rows)}
  _table(results, contexts)
  os.makedirs(FLAGS.out, exist_ok=True)
  setup = {"d_model": FLAGS.d_model, "heads": FLAGS.heads, "layers": 1, "dtype": "float32"}
  with open(json_path, "w") as f:
    json.dump({"setup": setup, "options": OPTIONS, "results": results}, f, indent=2)
  _plot(results, os.path.join(FLAGS.out, "decode.png"))


def _describe(row) -> str:
  if "error" in row:
    return row["error"]
  return (
    f"state {row['state_bytes'] / 2**20:8.2f} MiB  flops {row['flops'] or 0:10.3g}  "
    f"bytes {row['bytes_accessed'] or 0:10.3g}  time {row['time_s'] * 1e3:7.3f} ms"
  )


def _ratios(rows) -> dict:
  """Each figure at the longest context over the shortest (None if either is missing)."""
  ok = [r for r in rows if "error" not in r]
  if len(ok) < 2:
    return {}
  first, last = ok[0], ok[-1]
  return {
    key: (last[key] / first[key]) if first.get(key) and last.get(key) else None
    for key in ("state_bytes", "flops", "bytes_accessed", "time_s")
  }


def _table(results, contexts):
  span = f"L={max(contexts)} / L={min(contexts)}"
  print(f"\nratio {span}:")
  print(f"{'mixer':16s}{'state':>9s}{'flops':>9s}{'bytes':>9s}{'time':>9s}{'ms/token @max':>15s}")
  for mixer, res in results.items():
    cells = "".join(
      f"{v:9.2f}" if v is not None else f"{'-':>9s}"
      for v in (res["ratios"].get(k) for k in ("state_bytes", "flops", "bytes_accessed", "time_s"))
    )
    last = res["rows"][-1]
    ms = f"{last['time_s'] * 1e3:.3f}" if "time_s" in last else "-"
    print(f"{mixer:16s}{cells}{ms:>15s}")


def _plot(results, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for mixer, res in results.items():
    rows = [r for r in res["rows"] if "error" not in r]
    ls = [r["L"] for r in rows]
    axes[0].loglog(ls, [r["time_s"] * 1e3 for r in rows], "o-", label=mixer)
    axes[1].loglog(ls, [max(r["bytes_accessed"] or 1, 1) for r in rows], "o-", label=mixer)
  axes[0].set(xlabel="context length L", ylabel="ms per token (CPU)", title="decode time")
  axes[1].set(xlabel="context length L", ylabel="XLA bytes accessed per token", title="traffic")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  app.run(main)

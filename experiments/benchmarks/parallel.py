"""Communication and memory of each parallel strategy for one model, measured from compiled steps.

  python -m experiments.benchmarks.parallel [--platform=cpu|tpu] [--topology=v5e:2x4]

For every strategy the real train step (`training.loop.jit_steps`) is compiled for 8 devices
(simulated CPU devices, or compile-only TPU devices of --topology) and read, not run:
  - collective bytes per device per step by kind (`parallel.comm`: logical buffer sizes; async
    pairs once; loop bodies times their trip counts), against an analytic formula;
  - per-device peak memory from `memory_analysis()` and parameter + optimizer bytes per device;
  - for pipelines, the bubble: idle stage-steps counted in the schedule the implementation runs
    (`parallel.pipeline.schedule_table`), against GPipe's (p-1)/(m+p-1).
Writes results/parallel.json (results per platform; a run updates its platform's entry).
"""

import json
import math
import os

# 8 simulated CPU devices, set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

flags.DEFINE_enum("platform", "cpu", ["cpu", "tpu"], "Compile for CPU devices or a TPU slice.")
flags.DEFINE_string("topology", "v5e:2x4", "TPU slice for --platform=tpu (8 devices).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Output directory.")
FLAGS = flags.FLAGS

BATCH, SEQ = 32, 128
DENSE = dict(
  vocab_size=2048, d_model=256, num_layers=4, num_heads=8, mlp_dim=1024, tie_embeddings=False
)
MOE = dict(DENSE, mlp="moe", mlp_options={"num_experts": 8, "top_k": 2, "capacity_factor": 2.0})
# (name, preset, mesh sizes, other parallel settings, model)
STRATEGIES = [
  ("dp", "dp", {"data": 8}, {}, "dense"),
  ("fsdp", "fsdp", {"fsdp": 8}, {}, "dense"),
  ("dp_tp", "dp_tp", {"data": 2, "tensor": 4}, {}, "dense"),
  ("dp_tp sp", "dp_tp", {"data": 2, "tensor": 4}, {"sequence_parallel": True}, "dense"),
  ("fsdp_tp", "fsdp_tp", {"fsdp": 4, "tensor": 2}, {}, "dense"),
  ("dp_pp gpipe", "dp_pp", {"data": 4, "pipeline": 2}, {"pipeline_microbatches": 4}, "dense"),
  (
    "dp_pp circular",
    "dp_pp",
    {"data": 4, "pipeline": 2},
    {"pipeline_microbatches": 4, "pipeline_schedule": "circular", "pipeline_repeats": 2},
    "dense",
  ),
  ("dp_ep", "dp_ep", {"data": 2, "expert": 4}, {}, "moe"),
]
F32 = 4


def _tree_bytes(tree) -> int:
  import jax
  import numpy as np

  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _expected(name, sizes, settings, model, params, per_device) -> dict[str, float]:
  """Analytic collective bytes per device per step (logical buffers, as parallel.comm counts).

  G: gradient (= parameter) bytes; G_dev: a device's share of it under the strategy.
  """
  g = _tree_bytes(params)
  g_dev = per_device["params_bytes_per_device"]
  layers = model.num_layers
  rows = BATCH // (sizes.get("data", 1) * sizes.get("fsdp", 1) * sizes.get("expert", 1))
  act = rows * SEQ * model.d_model * F32  # One [rows, seq, d] activation of a device.
  if name == "dp":
    return {"all-reduce": g}  # One all-reduce of every gradient.
  if name == "fsdp":
    # ZeRO-3: gather every parameter forward and again backward, reduce-scatter the gradients.
    return {"all-gather": 2 * g, "reduce-scatter": g}
  if name == "dp_tp sp":
    # Sequence parallel: each of those activation all-reduces becomes a reduce-scatter to the
    # sequence-split residual plus an all-gather before the next mixer/MLP (same ring bytes).
    n = (4 * layers + 2) * act
    return {"reduce-scatter": n, "all-gather": n, "all-reduce": g_dev}
  if name in ("dp_tp", "fsdp_tp"):
    t = sizes["tensor"]
    # Megatron: all-reduce of the block's [rows, seq, d] output after attention and after the
    # MLP, forward and (for their inputs' gradients) backward, plus the vocab-parallel embedding
    # lookup (forward) and LM head input gradient (backward); gradients of the tensor-split
    # parameters reduced over the data-parallel axis.
    out = {"all-reduce": (4 * layers + 2) * act}
    if name == "fsdp_tp":
      out.update({"all-gather": 2 * g / t, "reduce-scatter": g / t})
    else:
      out["all-reduce"] += g_dev
    return out
  if name.startswith("dp_pp"):
    p, m = sizes["pipeline"], settings["pipeline_microbatches"]
    r = settings.get("pipeline_repeats", 1) if "circular" in name else 1
    mb = rows // m * SEQ * model.d_model * F32 + rows // m * F32  # Activation + aux row.
    extra = {}
    if r > 1:
      # The stack is stored stage-contiguous (device s: layers s·L/p ...), while the circular
      # schedule needs chunks k·p + s on device s: XLA re-lays the layer parameters out every
      # step (gather the stack forward, all-to-all the gradient shards back).
      stack = _tree_bytes(params["layers"])
      extra = {"all-gather": stack, "all-to-all": stack / p}
    return {
      **extra,
      # Every schedule step sends a microbatch forward; its gradient comes back.
      "collective-permute": 2 * (r * m + p - 1) * mb,
      # The last stage's outputs handed to all stages (and back), plus data-parallel gradients.
      "all-reduce": 2 * m * mb + g_dev,
    }
  if name == "dp_ep":
    opts = dict(model.mlp_options)
    e, k, ep = opts["num_experts"], opts["top_k"], sizes["expert"]
    tokens = BATCH * SEQ // (sizes["data"] * ep)
    from reslm.models.moe import capacity

    c = capacity(tokens, e, k, opts["capacity_factor"])
    # Dispatch and return all-to-all of [E, c, d] per MoE layer, forward and backward.
    return {"all-to-all": 4 * layers * e * c * model.d_model * F32, "all-reduce": g_dev}
  raise ValueError(name)


def _measure(name, preset, sizes, settings, kind, devices) -> dict:
  import jax

  from reslm.models import ModelConfig
  from reslm.parallel import aot as aot_lib
  from reslm.parallel import comm, pipeline
  from reslm.parallel import mesh as mesh_lib
  from reslm.parallel import rules as rules_lib
  from reslm.training import aot, loop
  from tests.parallel.common import train_config

  model = ModelConfig(**(MOE if kind == "moe" else DENSE), max_seq_len=SEQ)
  train = train_config()
  pcfg = mesh_lib.get_default_config()
  pcfg.update({"data": 1, "rules": preset, **sizes, **settings})
  mesh = mesh_lib.make_mesh(pcfg, devices)
  place = loop.placement(model, train, pcfg, mesh)
  import numpy as np

  example = {
    "inputs": np.zeros((BATCH, SEQ), np.int32),
    "targets": np.zeros((BATCH, SEQ), np.int32),
    "weights": np.ones((BATCH, SEQ), np.float32),
  }
  compiled = aot.compile_step(model, train, pcfg, mesh, example)
  found = comm.comm_bytes(compiled)
  per_device = rules_lib.placement_summary(place.abstract, place.state)
  expected = _expected(name, sizes, settings, model, place.abstract.params, per_device)
  measured_total = found["total_bytes"]
  expected_total = sum(expected.values())
  row = {
    "strategy": name,
    "mesh": sizes,
    "settings": settings,
    "model": kind,
    "bytes": found["bytes"],
    "link_bytes": found["link_bytes"],
    "ops": found["ops"],
    "measured_total_bytes": measured_total,
    "expected_bytes": expected,
    "expected_total_bytes": expected_total,
    "measured_over_expected": measured_total / expected_total if expected_total else None,
    "memory": aot_lib.memory(compiled),
    **per_device,
  }
  if "pipeline" in sizes:
    p, m = sizes["pipeline"], settings["pipeline_microbatches"]
    r = settings.get("pipeline_repeats", 1) if "circular" in name else 1
    table = pipeline.schedule_table(p, m, r)
    idle = sum(cell is None for step in table for cell in step) / (len(table) * p)
    row["bubble"] = {
      "schedule_idle_fraction": idle,
      "gpipe_formula": (p - 1) / (m + p - 1),
      "stages": p,
      "microbatches": m,
      "laps": r,
    }
  del jax
  return row


def _size(x: float) -> str:
  for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
    if abs(x) >= scale:
      return f"{x / scale:.2f} {unit}"
  return f"{x:.0f} B"


def _table(rows) -> None:
  short = {
    "all-reduce": "AR",
    "all-gather": "AG",
    "reduce-scatter": "RS",
    "all-to-all": "A2A",
    "collective-permute": "CP",
  }
  print(
    f"\n{'strategy':16s}{'measured (by kind)':>44s}{'formula':>12s}{'ratio':>7s}"
    f"{'peak mem':>11s}{'params+opt':>12s}{'bubble':>15s}"
  )
  for r in rows:
    kinds = ", ".join(f"{short[k]} {_size(v)}" for k, v in r["bytes"].items() if v)
    ratio = r["measured_over_expected"]
    bubble = r.get("bubble")
    bub = f"{bubble['schedule_idle_fraction']:.3f}/{bubble['gpipe_formula']:.3f}" if bubble else "-"
    state = r["params_bytes_per_device"] + r["opt_state_bytes_per_device"]
    print(
      f"{r['strategy']:16s}{kinds:>44s}{_size(r['expected_total_bytes']):>12s}"
      f"{ratio:7.2f}{_size(r['memory']['peak_bytes']):>11s}{_size(state):>12s}{bub:>15s}"
    )
  print("bubble: idle fraction of the executed schedule / GPipe formula (p-1)/(m+p-1)")


def main(argv):
  del argv
  from absl import logging

  logging.set_verbosity(logging.ERROR)
  import jax

  if FLAGS.platform == "tpu":
    from reslm.parallel import aot as aot_lib

    devices, _, _ = aot_lib.tpu_devices(FLAGS.topology)
    where = f"tpu {FLAGS.topology} (compile only)"
  else:
    devices = jax.devices()[:8]
    where = "cpu (8 simulated devices)"
  rows = []
  for name, preset, sizes, settings, kind in STRATEGIES:
    row = _measure(name, preset, sizes, settings, kind, devices)
    rows.append(row)
    print(
      f"{name:16s} total {_size(row['measured_total_bytes'])} (formula "
      f"{_size(row['expected_total_bytes'])})",
      flush=True,
    )
  _table(rows)
  os.makedirs(FLAGS.out, exist_ok=True)
  path = os.path.join(FLAGS.out, "parallel.json")
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f).get("results", {})
  results[FLAGS.platform] = {"where": where, "rows": rows}
  setup = {"batch": BATCH, "seq_len": SEQ, "dense": DENSE, "moe": MOE, "dtype": "float32"}
  with open(path, "w") as f:
    json.dump({"setup": setup, "results": results}, f, indent=2, sort_keys=True)


if __name__ == "__main__":
  app.run(main)

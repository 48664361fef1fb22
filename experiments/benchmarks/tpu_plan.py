"""Plan Llama-2-shaped training on Cloud TPU slices from a CPU host: XLA's estimates, per chip.

  JAX_PLATFORMS=cpu python -m experiments.benchmarks.tpu_plan [--sizes=1b,7b,13b] \
      [--topologies=v5e-16,v5p-8,v6e-8] [--variants=flash_bs1,flash_bs4,dense_bs1,dense_bs4] \
      [--set=model.remat=dots --label=remat_dots] [--force]

Each row compiles `experiments/configs/llama2_7b.py:<variant>` (at the 1B / 7B / 13B shapes of
`SHAPES`, the batch scaled to the slice's chips) with libtpu for the slice, through
`training.aot.compile_only`, and reports:
  - per-chip memory of the real program (scanned layers, remat as configured) against HBM;
  - XLA's estimated step time (`optimal_seconds` of loop-free variants at 1 and 2 layers,
    extrapolated linearly in layers, with the ConcatBitcast correction: research/tpu_aot.md);
  - estimated MFU under two conventions: the codebase's counted model FLOPs (full attention score
    matrix, `training.flops.model_flops`) and MaxText's / PaLM's causal convention,
    6·N + 6·L·S·H·d_head per token with N the matmul parameters excluding the input embedding
    (the convention of the reference figures in research/tpu_aot.md);
  - tokens/s per chip from the estimated step time;
  - collective bytes per device per step by kind (`parallel.comm`, real program) against FSDP's
    formula: bf16 weights gathered once per use (forward; with full remat again for the recompute;
    backward) and f32 gradients reduce-scattered. On TPU the gathers and reductions mostly run as
    windowed-einsum rings of collective-permutes, so the totals are what compare.
Every figure is XLA's static estimate on a CPU host, not a measurement. Rows are cached in
results/tpu_plan.json by (size, topology, variant, label); --force recompiles. Compiles are
CPU-heavy (minutes per 7B row): run one process at a time.
"""

import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

flags.DEFINE_list("sizes", ["7b"], "Model shapes: 1b, 7b, 13b.")
flags.DEFINE_list("topologies", ["v5e-16"], "TPU slices, e.g. v5e-16, v5p-8, v6e-8.")
flags.DEFINE_list(
  "variants",
  ["flash_bs1", "flash_bs4", "dense_bs1", "dense_bs4"],
  "Variants of experiments/configs/llama2_7b.py.",
)
flags.DEFINE_multi_string("set", [], "Config overrides key=value (e.g. model.remat=dots).")
flags.DEFINE_string("label", "", "Name of this set of overrides in the results ('' = none).")
flags.DEFINE_bool("force", False, "Recompile rows already in the results file.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Output directory.")
FLAGS = flags.FLAGS

GIB = 2**30
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def _parse(value: str):
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return {"True": True, "False": False}.get(value, value)


def make_config(size: str, variant: str, chips: int, overrides=()):
  """The planning config at `size`, batch per chip times `chips`, with dotted overrides."""
  from experiments.configs import llama2_7b  # noqa: PLC0415

  if size not in llama2_7b.SHAPES:
    raise ValueError(f"--sizes={size} is not known; choose from {', '.join(llama2_7b.SHAPES)}")
  cfg = llama2_7b.get_config(variant)
  cfg.model.update(**llama2_7b.SHAPES[size])
  cfg.data.batch_size = cfg.data.batch_size // llama2_7b.CHIPS * chips
  cfg.name = f"llama2_{size}_{variant}"
  for item in overrides:
    key, sep, value = item.partition("=")
    *path, leaf = key.split(".")
    if not sep or not path:
      raise ValueError(f"--set={item} is not section.key=value")
    node = cfg
    for part in path:
      node = node[part]
    node[leaf] = _parse(value)
  return cfg


def param_count(model_cfg) -> int:
  """Every parameter of the model (embeddings, head, norms), from its abstract state."""
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from reslm.models import build_model  # noqa: PLC0415

  state = nnx.state(nnx.eval_shape(lambda: build_model(model_cfg)))
  return sum(x.size for x in jax.tree.leaves(state))


def fsdp_formula(params: int, remat: str) -> dict[str, float]:
  """FSDP bytes per device per step: bf16 weights gathered per use, f32 gradients scattered.

  Forward and backward each gather every weight once; full remat gathers again for the
  recompute (MaxText's count: 3 gathers), other policies keep the forward's.
  """
  gathers = 3 if remat == "full" else 2
  return {"all-gather": gathers * 2.0 * params, "reduce-scatter": 4.0 * params}


def measure(size: str, topology: str, variant: str, overrides) -> dict:
  from reslm.parallel import aot as aot_lib  # noqa: PLC0415
  from reslm.training import aot  # noqa: PLC0415
  from reslm.training import config as config_lib  # noqa: PLC0415

  _, _, chips = aot_lib.parse_topology(topology)
  cfg = make_config(size, variant, chips, overrides)
  start = time.time()
  report = aot.compile_only(cfg, topology)
  est = report["estimate"]
  model_cfg = config_lib.model_config(cfg, cfg.model.vocab_size)
  counted = report["estimate"]["model_flops_per_step"]
  tokens = cfg.data.batch_size * cfg.data.seq_len
  step = est["step_seconds"]
  peak = est["peak_flops_per_s"]
  matmul = report["estimate"].get("matmul_params")
  causal_per_token = 6 * matmul + 6 * model_cfg.num_layers * cfg.data.seq_len * (
    model_cfg.num_heads * model_cfg.resolved_head_dim
  )
  params = param_count(model_cfg)
  comm = report["comm_bytes_per_step"]
  formula = fsdp_formula(params, model_cfg.remat)
  mem = report["memory_per_device"]
  return {
    "size": size,
    "topology": report["topology"],
    "variant": variant,
    "overrides": list(overrides),
    "chips": chips,
    "global_batch": cfg.data.batch_size,
    "seq_len": cfg.data.seq_len,
    "params": params,
    "matmul_params": matmul,
    "memory_per_chip_gib": mem["peak_bytes"] / GIB,
    "hbm_gib": mem["hbm_bytes"] / GIB,
    "fits": mem["fits"],
    "step_seconds_estimate": step,
    "mfu_counted_estimate": counted / (step * peak) if step else None,
    "mfu_causal_estimate": causal_per_token * tokens / (step * peak) if step else None,
    "tokens_per_s_per_chip_estimate": tokens / step / chips if step else None,
    "comm_bytes_per_device": {k: comm[k] for k in KINDS},
    "comm_total_bytes": sum(comm[k] for k in KINDS),
    "fsdp_formula_bytes": formula,
    "fsdp_formula_total_bytes": sum(formula.values()),
    "compile_seconds": time.time() - start,
    "report": report,
    "note": "XLA's static estimates (libtpu cost model on a CPU host), not measurements",
  }


def _row_line(r: dict) -> str:
  comm = r["comm_bytes_per_device"]
  kinds = ", ".join(
    f"{k.replace('collective-permute', 'CP')} {v / GIB:.1f}" for k, v in comm.items() if v > 2**20
  )
  ratio = r["comm_total_bytes"] / r["fsdp_formula_total_bytes"]
  label = f"{r['size']} {r['topology']} {r['variant']}" + (
    f" [{','.join(r['overrides'])}]" if r["overrides"] else ""
  )
  return (
    f"{label:48s} mem {r['memory_per_chip_gib']:5.2f}/{r['hbm_gib']:.0f} GiB"
    f"{'' if r['fits'] else ' (NO FIT)'}  step {r['step_seconds_estimate'] * 1e3:7.1f} ms  "
    f"MFU {100 * r['mfu_causal_estimate']:4.1f}% causal / {100 * r['mfu_counted_estimate']:4.1f}% "
    f"counted  {r['tokens_per_s_per_chip_estimate']:7.0f} tok/s/chip  comm GiB {kinds} "
    f"({ratio:.2f}x formula)"
  )


def main(argv):
  del argv
  from absl import logging  # noqa: PLC0415

  logging.set_verbosity(logging.ERROR)
  os.makedirs(FLAGS.out, exist_ok=True)
  path = os.path.join(FLAGS.out, "tpu_plan.json")
  rows = {}
  if os.path.exists(path):
    with open(path) as f:
      rows = {r["key"]: r for r in json.load(f)["rows"]}
  label = FLAGS.label or ",".join(FLAGS.set) or "baseline"
  print("XLA's estimates (libtpu's static cost model on a CPU host), not measurements.")
  for size in FLAGS.sizes:
    for topology in FLAGS.topologies:
      for variant in FLAGS.variants:
        key = f"{size}|{topology}|{variant}|{label}"
        if key not in rows or FLAGS.force:
          try:
            row = measure(size, topology, variant, FLAGS.set)
          except Exception as err:  # A row that does not compile (e.g. HBM OOM) is a result too.
            row = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
          rows[key] = {"key": key, "label": label, **row}
          with open(path, "w") as f:
            json.dump({"rows": list(rows.values())}, f, indent=1, sort_keys=True)
        r = rows[key]
        print(f"{key}: {r['error']}" if "error" in r else _row_line(r), flush=True)


if __name__ == "__main__":
  app.run(main)

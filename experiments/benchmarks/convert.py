"""Importing a Hugging Face checkpoint: time and peak host memory vs checkpoint size.

  python -m experiments.benchmarks.convert [--widths=256,512,768,1024] [--devices=8]

For each width this writes a Llama-shaped checkpoint of random bfloat16 weights (safetensors
shards of at most --shard_mb, with an index, as `save_pretrained` writes them), then in a fresh
child process with --devices simulated CPU devices imports it onto an FSDP mesh
(`reader.HFCheckpoint.load` with the `fsdp` preset's shardings) and reports:
  - seconds: the import (headers, checks and every shard placed), after JAX start-up;
  - peak_increase: the child's peak resident memory (ru_maxrss) minus its resident memory just
    before the import: what the import adds at its worst;
  - bound: 1.2 x the largest shard file + the model's own bytes (on CPU "device" memory is host
    memory, so the placed parameters count too). The import must stay under it: it never holds a
    second copy of the checkpoint, only the parameters and the slice being placed;
  - naive_peak_increase: the same for reading every tensor with `safetensors.numpy.load_file`
    and then placing the arrays (two copies at once), for contrast.
Writes results/convert.json and results/convert.png; the cost should grow linearly with the size.
"""

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_list("widths", ["256", "512", "768", "1024"], "d_model of each checkpoint.")
flags.DEFINE_integer("num_layers", 8, "Layers.")
flags.DEFINE_integer("vocab", 16384, "Vocabulary size.")
flags.DEFINE_integer("shard_mb", 48, "Largest safetensors shard written, MiB.")
flags.DEFINE_integer("devices", 8, "Simulated CPU devices of the child (all on the fsdp axis).")
flags.DEFINE_bool("naive", True, "Also measure a load_file-then-place import for contrast.")
flags.DEFINE_string("child", None, "Internal: import this directory and print one JSON line.")
flags.DEFINE_string("method", "ours", "Internal: ours | naive.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Output directory.")
FLAGS = flags.FLAGS


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux.


def write_checkpoint(directory: str, width: int) -> dict:
  """A Llama-shaped checkpoint of random bf16 weights, one tensor in memory at a time."""
  import ml_dtypes
  import numpy as np

  from reslm.hf.weights import save_sharded

  heads = max(1, width // 64)
  hidden = int(8 * width / 3) // 64 * 64
  config = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=FLAGS.vocab,
    hidden_size=width, intermediate_size=hidden, num_hidden_layers=FLAGS.num_layers,
    num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
    torch_dtype="bfloat16",
  )  # fmt: skip
  rng = np.random.default_rng(0)
  shapes = {"model.embed_tokens.weight": (FLAGS.vocab, width)}
  for i in range(FLAGS.num_layers):
    p = f"model.layers.{i}."
    for n in ("q", "k", "v", "o"):
      shapes[f"{p}self_attn.{n}_proj.weight"] = (width, width)
    shapes[f"{p}mlp.gate_proj.weight"] = shapes[f"{p}mlp.up_proj.weight"] = (hidden, width)
    shapes[f"{p}mlp.down_proj.weight"] = (width, hidden)
    shapes[f"{p}input_layernorm.weight"] = shapes[f"{p}post_attention_layernorm.weight"] = (width,)
  shapes["model.norm.weight"] = (width,)
  shapes["lm_head.weight"] = (FLAGS.vocab, width)

  def tensors():
    for name, shape in shapes.items():
      yield name, (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)

  save_sharded(tensors(), directory, max_shard_bytes=FLAGS.shard_mb * 2**20)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
  sizes = [os.path.getsize(os.path.join(directory, f)) for f in files]
  return {
    "width": width,
    "checkpoint_bytes": sum(sizes),
    "largest_shard_bytes": max(sizes),
    "shards": len(files),
    "model_bytes": 2 * sum(math.prod(s) for s in shapes.values()),
  }


def child(directory: str, method: str) -> dict:
  """Runs in the child process: imports `directory` onto an fsdp mesh, measures."""
  import jax
  from jax.sharding import NamedSharding

  from reslm.hf.reader import HFCheckpoint
  from reslm.parallel import mesh as mesh_lib
  from reslm.training import loop
  from reslm.training.config import get_train_defaults

  pcfg = mesh_lib.get_default_config()
  pcfg.update(data=1, fsdp=-1, rules="fsdp")
  mesh = mesh_lib.make_mesh(pcfg)
  ckpt = HFCheckpoint(directory)
  place = loop.placement(ckpt.cfg, get_train_defaults(), pcfg, mesh)  # Shapes only.
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), place.specs)
  del place
  before = _rss()
  t0 = time.perf_counter()
  if method == "ours":
    model = ckpt.load(shardings)
    arrays = jax.tree.leaves(model)
  else:  # Every tensor read whole into host memory, then placed.
    import numpy as np
    from safetensors.numpy import load_file

    from reslm.hf.reader import read_part

    host = {}
    for f in sorted(os.listdir(directory)):
      if f.endswith(".safetensors"):
        host.update(load_file(os.path.join(directory, f)))
    graphdef, abstract = ckpt.abstract()
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    arrays = []
    for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings), strict=True):
      key = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
      src = ckpt.sources[key]
      names = ckpt.names[key]

      class Whole:  # `read_part` over the in-memory tensors.
        @staticmethod
        def read(name, index):
          return host[name][index]

      full = [read_part(Whole, n, src, (slice(None),) * len(src.view)) for n in names]
      value = np.stack(full) if src.stacked else full[0]
      arrays.append(jax.device_put(value.astype(leaf.dtype), sharding))
  jax.block_until_ready(arrays)
  seconds = time.perf_counter() - t0
  return {
    "seconds": seconds,
    "rss_before": before,
    "peak_increase": _peak() - before,
    "placed_bytes": int(sum(a.nbytes for a in arrays)),
    "devices": jax.device_count(),
  }


def run_child(directory: str, method: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={FLAGS.devices}"
  out = subprocess.run(
    [sys.executable, "-m", "experiments.benchmarks.convert", f"--child={directory}",
     f"--method={method}"],
    env=env, capture_output=True, text=True, check=False,
  )  # fmt: skip
  if out.returncode:
    raise RuntimeError(f"child failed: {out.stderr.strip().splitlines()[-1]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.child:
    print(json.dumps(child(FLAGS.child, FLAGS.method)))
    return
  rows = []
  mib = 2**20
  print(
    f"{'width':>6} {'ckpt MiB':>9} {'shard MiB':>9} {'model MiB':>9} {'seconds':>8} "
    f"{'peak+ MiB':>9} {'bound MiB':>9} {'naive peak+':>11}"
  )
  for width in map(int, FLAGS.widths):
    with tempfile.TemporaryDirectory() as directory:
      row = write_checkpoint(directory, width)
      row.update(run_child(directory, "ours"))
      if FLAGS.naive:
        row["naive_peak_increase"] = run_child(directory, "naive")["peak_increase"]
    row["bound"] = int(1.2 * row["largest_shard_bytes"] + row["model_bytes"])
    row["within_bound"] = row["peak_increase"] <= row["bound"]
    rows.append(row)
    naive = row.get("naive_peak_increase")
    print(
      f"{width:>6} {row['checkpoint_bytes'] / mib:>9.1f} {row['largest_shard_bytes'] / mib:>9.1f} "
      f"{row['model_bytes'] / mib:>9.1f} {row['seconds']:>8.2f} {row['peak_increase'] / mib:>9.1f} "
      f"{row['bound'] / mib:>9.1f} {(naive or 0) / mib:>11.1f}"
    )
  sizes = [r["checkpoint_bytes"] for r in rows]
  seconds = [r["seconds"] for r in rows]
  per_gib = [s / (b / 2**30) for s, b in zip(seconds, sizes, strict=True)]
  summary = {
    "rows": rows,
    "seconds_per_gib": per_gib,
    "settings": {
      "num_layers": FLAGS.num_layers,
      "vocab": FLAGS.vocab,
      "shard_mb": FLAGS.shard_mb,
      "devices": FLAGS.devices,
      "mesh": "fsdp",
      "dtype": "bfloat16",
    },  # fmt: skip
  }
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "convert.json"), "w") as f:
    json.dump(summary, f, indent=2)
  _plot(rows, os.path.join(FLAGS.out, "convert.png"))
  print(f"seconds per GiB: {', '.join(f'{x:.2f}' for x in per_gib)}")
  print(f"within the bound: {all(r['within_bound'] for r in rows)}")


def _plot(rows, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  mib = 2**20
  x = [r["checkpoint_bytes"] / mib for r in rows]
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  left.plot(x, [r["seconds"] for r in rows], "o-")
  left.set(xlabel="checkpoint (MiB)", ylabel="import seconds", title="Import time")
  right.plot(x, [r["peak_increase"] / mib for r in rows], "o-", label="import (ours)")
  right.plot(x, [r["bound"] / mib for r in rows], "--", label="1.2 x shard + model")
  if "naive_peak_increase" in rows[0]:
    right.plot(x, [r["naive_peak_increase"] / mib for r in rows], "s:", label="load_file + place")
  right.set(xlabel="checkpoint (MiB)", ylabel="peak RSS increase (MiB)", title="Host memory")
  right.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  app.run(main)

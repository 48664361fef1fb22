"""Convert between Hugging Face model directories and run directories.

Import (a run that evaluate, generate, compress and train accept unchanged):

  python -m experiments.convert --hf_dir=/path/to/SmolLM-135M --workdir=/tmp/smollm \
      [--config=experiments/configs/hf.py] [--config.data.path=...] [--config.parallel.fsdp=-1] \
      [--dtype=bfloat16] [--param_dtype=float32]

Export (a run, or a compressed run from experiments.compress, dequantised):

  python -m experiments.convert --workdir=/tmp/smollm_int8 --to_hf=/tmp/smollm_int8_hf

Weights are read with safetensors (no torch) and placed shard by shard on the configured mesh
(`--config.parallel.*`). Bad input (an unsupported model_type, a missing / unexpected / mis-shaped
tensor, a config field the model cannot honour, a truncated file, no weights) is one
`error: ...` line before any weight is read.
"""

from absl import flags
from ml_collections import config_flags

from experiments import cli

config_flags.DEFINE_config_file(
  "config",
  "experiments/configs/hf.py",
  "Experiment config of the converted run (data, train, parallel); its model section is replaced "
  "by the checkpoint's architecture.",
  lock_config=True,
)
flags.DEFINE_string("hf_dir", None, "Hugging Face model directory to import.")
flags.DEFINE_string("workdir", None, "Run directory: written on import, read on export.")
flags.DEFINE_string("to_hf", None, "Export --workdir as a Hugging Face model directory here.")
flags.DEFINE_string("dtype", "", "Compute dtype (default: the checkpoint's stored dtype).")
flags.DEFINE_string("param_dtype", "", "Parameter dtype (default: the checkpoint's stored dtype).")
flags.DEFINE_bool("best", False, "Export the best checkpoint instead of the latest.")
flags.DEFINE_integer("max_shard_mb", 5 * 1024, "Export: largest safetensors shard, in MiB.")
FLAGS = flags.FLAGS


@cli.one_line_errors
def main(argv):
  del argv
  if not FLAGS.workdir:
    raise ValueError("--workdir is required (the run to write, or with --to_hf the run to export)")
  if bool(FLAGS.hf_dir) == bool(FLAGS.to_hf):
    raise ValueError("give either --hf_dir (import into --workdir) or --to_hf (export --workdir)")
  for name in ("dtype", "param_dtype"):
    value = getattr(FLAGS, name)
    if value and value not in ("float32", "bfloat16", "float16"):
      raise ValueError(
        f"--{name}={value!r} is not known; choose one of: float32, bfloat16, float16"
      )
  if FLAGS.max_shard_mb < 1:
    raise ValueError(f"--max_shard_mb={FLAGS.max_shard_mb} must be >= 1")
  from reslm.hf import runs

  if FLAGS.to_hf:
    runs.export_run(
      FLAGS.workdir, FLAGS.to_hf, best=FLAGS.best, max_shard_bytes=FLAGS.max_shard_mb * 2**20
    )
    print(f"wrote {FLAGS.to_hf}")
    return
  summary = runs.convert(
    FLAGS.hf_dir,
    FLAGS.workdir,
    FLAGS.config,
    dtype=FLAGS.dtype or None,
    param_dtype=FLAGS.param_dtype or None,
  )
  print(
    f"{summary['model_type']}: {summary['parameters']:,} parameters ({summary['param_dtype']}, "
    f"compute {summary['dtype']}) on mesh {summary['mesh']} -> {summary['workdir']}"
  )


if __name__ == "__main__":
  cli.run(main)

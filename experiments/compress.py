"""Compress a trained run by rules, evaluate it and write the compressed checkpoint.

  python -m experiments.compress --config=experiments/configs/compress/quantize.py:gptq4 \
      --workdir=/tmp/shakespeare_char --out=/tmp/shakespeare_char_gptq4

Prints the stored bytes, validation loss / bits per byte before and after, fidelity to the
uncompressed model and a row per compressed module; writes --out/report.json and a checkpoint
under --out that `compress.load_compressed(out)` restores.
"""

from absl import flags

from experiments import cli

cli.define_config_flag()
cli.define_workdir_flag()
flags.DEFINE_string(
  "out", None, "Where to write the compressed checkpoint and report.", required=True
)
FLAGS = flags.FLAGS


@cli.one_line_errors
def main(argv):
  del argv
  from reslm.compress import pipeline

  report = pipeline.run(FLAGS.config, FLAGS.workdir, FLAGS.out)
  print(pipeline.format_report(report))


if __name__ == "__main__":
  cli.run(main)

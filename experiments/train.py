"""Train, evaluate, sample and print the efficiency report.

  python -m experiments.train --config=experiments/configs/mqar.py --workdir=/tmp/mqar \
      [--config.train.steps=500 --config.model.num_layers=2 ...]

Rerunning the same command resumes from the last checkpoint in --workdir.
"""

from absl import flags

from experiments import cli

cli.define_config_flag()
cli.define_workdir_flag()
flags.DEFINE_integer("sample_tokens", 48, "Tokens to generate from an eval prompt after training.")
flags.DEFINE_bool(
  "multihost",
  False,
  "Call jax.distributed.initialize() first (multi-host TPU slices, GPU clusters); the coordinator "
  "and process ids come from the environment (TPU metadata, SLURM, JAX_COORDINATOR_ADDRESS, ...).",
)
FLAGS = flags.FLAGS


@cli.one_line_errors
def main(argv):
  del argv
  # Imported here so `--help` and flag errors do not pay for JAX start-up.
  import jax

  if FLAGS.multihost:
    jax.distributed.initialize()
  from experiments import showcase
  from metrics import format_report
  from training import train_and_evaluate

  result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if result.preempted:
    print(f"preempted at step {result.step}; checkpoint saved. Rerun the command to resume.")
    return
  print("\n" + "\n".join(f"{k}: {v:.4f}" for k, v in result.eval.items()))
  if FLAGS.sample_tokens and jax.process_index() == 0:
    print("\n" + showcase.sample_from_run(FLAGS.workdir, FLAGS.sample_tokens))
  print("\nEfficiency report (also in efficiency_report.json):\n" + format_report(result.report))


if __name__ == "__main__":
  cli.run(main)

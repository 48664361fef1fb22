"""Train, evaluate, sample and print the efficiency report.

  python -m experiments.train --config=experiments/configs/mqar.py --workdir=/tmp/mqar \
      [--config.train.steps=500 --config.model.num_layers=2 ...]

Rerunning the same command resumes from the last checkpoint in --workdir.

Plan a TPU run on this (CPU-only) machine: compile the real train step for a slice and print
per-device memory (fits in HBM?), XLA's estimated step time and MFU, and the collective bytes:

  JAX_PLATFORMS=cpu python -m experiments.train --config=experiments/configs/mqar.py \
      --compile_only --topology=v5e-16 --config.parallel.fsdp=-1 --config.parallel.data=1
"""

import json
import os

from absl import flags

from experiments import cli

cli.define_config_flag()
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, reports).")
flags.DEFINE_integer("sample_tokens", 48, "Tokens to generate from an eval prompt after training.")
flags.DEFINE_bool(
  "multihost",
  False,
  "Join a multi-process job first (jax.distributed): multi-host TPU slices, GPU clusters, or "
  "several local CPU processes. Unset --coordinator_address/--num_processes/--process_id come "
  "from the environment (JAX_COORDINATOR_ADDRESS, ..., TPU metadata, SLURM).",
)
flags.DEFINE_string("coordinator_address", None, "With --multihost: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "With --multihost: processes in the job.")
flags.DEFINE_integer("process_id", None, "With --multihost: this process's index.")
flags.DEFINE_integer(
  "heartbeat_timeout",
  100,
  "With --multihost: seconds without a peer's heartbeat before the job stops with an error "
  "(a whole number >= 1).",
)
flags.DEFINE_bool(
  "compile_only",
  False,
  "Compile the train step ahead of time for --topology and report memory, estimated step time "
  "and MFU and collective bytes; trains nothing (needs the libtpu wheel, no TPU).",
)
flags.DEFINE_string("topology", None, "TPU slice for --compile_only, e.g. v5e-16, v5p-8, v5e:4x4.")
flags.DEFINE_bool("estimate", True, "With --compile_only: also estimate step time and MFU.")
FLAGS = flags.FLAGS


def plan(config, topology: str, workdir: str | None, estimate: bool) -> None:
  """--compile_only: print (and, with a workdir, save) the ahead-of-time compile report."""
  from reslm.training import aot

  report = aot.compile_only(config, topology, estimate=estimate)
  print(aot.format_plan(report))
  if workdir:
    from reslm.training import runs

    runs.claim_workdir(workdir)  # A run directory (or a new one), never someone else's.
    path = os.path.join(workdir, f"compile_only_{report['topology'].replace(':', '_')}.json")
    with open(path, "w") as f:
      json.dump(report, f, indent=2, sort_keys=True)


@cli.one_line_errors
def main(argv):
  del argv
  if FLAGS.compile_only:
    if not FLAGS.topology:
      raise ValueError("--compile_only needs --topology (a TPU slice such as v5e-16 or v5e:4x4)")
    plan(FLAGS.config, FLAGS.topology, FLAGS.workdir, FLAGS.estimate)
    return
  if not FLAGS.workdir:
    raise ValueError("--workdir is required to train (a run directory for checkpoints and logs)")
  # Imported here so `--help` and flag errors do not pay for JAX start-up.
  from reslm.parallel import distributed

  if FLAGS.sample_tokens < 0:
    raise ValueError(f"--sample_tokens={FLAGS.sample_tokens} must be >= 0 (0 = no sample)")
  if FLAGS.multihost:
    distributed.initialize(
      FLAGS.coordinator_address,
      FLAGS.num_processes,
      FLAGS.process_id,
      heartbeat_timeout=FLAGS.heartbeat_timeout,
    )
  ok = False
  try:
    train(FLAGS.config, FLAGS.workdir, FLAGS.sample_tokens)
    ok = True
  except RuntimeError as e:
    if FLAGS.multihost and "by peer" in str(e):  # Gloo: "Connection closed/reset by peer".
      first = str(e).strip().splitlines()[0]
      raise RuntimeError(f"another process of the job died (a collective lost it): {first}") from e
    raise
  finally:
    distributed.finish(ok)  # So the other processes neither wait for nor mourn this one.


def train(config, workdir: str, sample_tokens: int) -> None:
  """Trains, then process 0 alone prints the evaluation, a sample and the report.

  Nothing after training enters a collective or a cross-process barrier: `load_run` (for the
  sample) reads the checkpoint on this process only.
  """
  import jax

  import reslm.compress  # noqa: F401  (registers its objective sections, e.g. distill)
  from experiments import showcase
  from reslm.metrics import format_report
  from reslm.training import train_and_evaluate

  result = train_and_evaluate(config, workdir)
  if result.preempted:
    print(f"preempted at step {result.step}; checkpoint saved. Rerun the command to resume.")
    return
  if jax.process_index() != 0:
    return  # Process 0 speaks for a multi-process job.
  print("\n" + "\n".join(f"{k}: {v:.4f}" for k, v in result.eval.items()))
  if sample_tokens:
    print("\n" + showcase.sample_from_run(workdir, sample_tokens))
  print("\nEfficiency report (also in efficiency_report.json):\n" + format_report(result.report))


if __name__ == "__main__":
  cli.run(main)

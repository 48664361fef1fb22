"""Evaluate a trained run on its validation data.

  python -m experiments.evaluate --workdir=/tmp/mqar [--best] [--eval_batches=50]

Prints loss, perplexity, accuracy (and bits per byte for text) and writes eval.json in --workdir.
"""

import json
import os

from absl import flags

from experiments import cli

cli.define_workdir_flag()
flags.DEFINE_bool("best", False, "Evaluate the best checkpoint instead of the latest.")
flags.DEFINE_integer("eval_batches", 0, "Batches to evaluate (0 = the run's train.eval_batches).")
FLAGS = flags.FLAGS


@cli.one_line_errors
def main(argv):
  del argv
  if FLAGS.eval_batches < 0:
    raise ValueError(f"--eval_batches={FLAGS.eval_batches} must be >= 0 (0 = the run's own)")
  import jax
  from flax import nnx

  from reslm import data as data_lib
  from reslm.training import load_run, make_eval_step
  from reslm.training.loop import evaluate

  cfg, model, _, step = load_run(FLAGS.workdir, best=FLAGS.best)
  dataset = data_lib.build_dataset(cfg.data)
  graphdef, params = nnx.split(model)
  eval_fn = jax.jit(make_eval_step(graphdef))
  batches = dataset.eval_batches(FLAGS.eval_batches or cfg.train.eval_batches)
  result = {
    "step": step,
    **evaluate(eval_fn, params.to_pure_dict(), batches, dataset.bytes_per_token),
  }
  for k, v in result.items():
    print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
  with open(os.path.join(FLAGS.workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  cli.run(main)

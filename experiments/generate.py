"""Generate text (or token ids) from a trained run with a KV cache in one compiled loop.

  python -m experiments.generate --workdir=/tmp/shakespeare --prompt="ROMEO:" \
      --max_new_tokens=200 --temperature=0.8 --top_k=40 [--top_p=0.95] [--best]

For runs on synthetic tasks (no tokenizer) the prompt is comma-separated token ids.
"""

from absl import flags

from experiments import cli

cli.define_workdir_flag()
flags.DEFINE_string("prompt", "\n", "Prompt text (or comma-separated ids for synthetic tasks).")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_integer("num_samples", 1, "Independent samples.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("best", False, "Use the best checkpoint instead of the latest.")
FLAGS = flags.FLAGS


def check_sampling_flags() -> None:
  """One-line errors for sampling flags out of range (NaN included), before loading anything."""
  import math

  if FLAGS.num_samples < 1:
    raise ValueError(f"--num_samples={FLAGS.num_samples} must be >= 1")
  if FLAGS.max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={FLAGS.max_new_tokens} must be >= 1")
  if not (math.isfinite(FLAGS.temperature) and FLAGS.temperature >= 0):
    raise ValueError(f"--temperature={FLAGS.temperature} must be a finite number >= 0 (0 = greedy)")
  if FLAGS.top_k < 0:
    raise ValueError(f"--top_k={FLAGS.top_k} must be >= 0 (0 = all tokens)")
  if not (math.isfinite(FLAGS.top_p) and 0 < FLAGS.top_p <= 1):
    raise ValueError(f"--top_p={FLAGS.top_p} must be in (0, 1] (1 = off)")


def parse_prompt(prompt: str, tokenizer, vocab_size: int):
  import numpy as np

  if tokenizer is not None:
    ids = tokenizer.encode(prompt)
  else:
    try:
      ids = np.array([int(x) for x in prompt.split(",") if x.strip()], np.int64)
    except ValueError:
      raise ValueError(
        f"--prompt={prompt!r}: this run has no tokenizer (synthetic task); give comma-separated "
        "token ids"
      ) from None
  if len(ids) == 0:
    raise ValueError("--prompt is empty after tokenization")
  bad = [int(i) for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(
      f"--prompt={prompt!r} has token id {bad[0]}; this model's ids are 0..{vocab_size - 1}"
    )
  return ids.astype(np.int32)


@cli.one_line_errors
def main(argv):
  del argv
  check_sampling_flags()
  import jax
  import numpy as np

  from reslm.data.tokenizers import tokenizer_from_dict
  from reslm.inference import generate
  from reslm.training import load_run

  _, model, meta, _ = load_run(FLAGS.workdir, best=FLAGS.best)
  if model.cfg.kind != "decoder":
    raise ValueError(
      f"generation needs a decoder model; this run's model.kind is {model.cfg.kind!r}"
    )
  tokenizer = tokenizer_from_dict(meta["tokenizer"]) if meta.get("tokenizer") else None
  ids = parse_prompt(FLAGS.prompt, tokenizer, model.cfg.vocab_size)
  prompt = np.repeat(ids[None], FLAGS.num_samples, axis=0)
  out = generate(
    model,
    prompt,
    max_new_tokens=FLAGS.max_new_tokens,
    rng=jax.random.key(FLAGS.seed),
    temperature=FLAGS.temperature,
    top_k=FLAGS.top_k,
    top_p=FLAGS.top_p,
  )
  for row in np.asarray(out):
    print(tokenizer.decode(row) if tokenizer is not None else ",".join(map(str, row)))
    print("-" * 40)


if __name__ == "__main__":
  cli.run(main)

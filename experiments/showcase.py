"""A short, human-readable look at what a trained run does (printed by `experiments.train`)."""

import jax
import numpy as np

from reslm import data as data_lib
from reslm.inference import generate
from reslm.training import load_run


def sample_from_run(workdir: str, max_new_tokens: int) -> str:
  """Text runs: a greedy continuation of an eval prompt next to the reference text.

  Synthetic tasks: the model's next-token predictions at the scored positions of one eval
  sequence (e.g. MQAR: each queried key, the value predicted and the true value).
  """
  cfg, model, _, step = load_run(workdir)
  dataset = data_lib.build_dataset(cfg.data)
  batch = dataset.eval_batches(1)[0]
  inputs = np.asarray(batch["inputs"][0])
  targets = np.asarray(batch["targets"][0])
  tok = dataset.tokenizer
  if tok is None or model.cfg.kind != "decoder":
    logits = model(inputs[None]).logits[0]
    pred = np.asarray(jax.numpy.argmax(logits, -1))
    scored = np.flatnonzero(np.asarray(batch["weights"][0]) > 0)
    hits = pred[scored] == targets[scored]
    rows = [
      f"    input {inputs[i]:>4} -> predicted {pred[i]:>4}  (true {targets[i]})" for i in scored[:8]
    ]
    return "\n".join(
      [
        f"Predictions at scored positions of one eval sequence (step {step}):",
        *rows,
        f"  correct: {hits.sum()}/{hits.size}",
      ]
    )
  prompt_len = len(inputs) // 2
  new = min(max_new_tokens, model.cfg.max_seq_len - prompt_len)
  out = np.asarray(
    generate(
      model, inputs[None, :prompt_len], max_new_tokens=new, rng=jax.random.key(0), temperature=0.0
    )
  )[0]
  reference = targets[prompt_len - 1 :][:new]
  return "\n".join(
    [
      f"Sample (step {step}, greedy, {new} tokens after a {prompt_len}-token eval prompt):",
      f"  prompt:    {tok.decode(inputs[:prompt_len])!r}",
      f"  model:     {tok.decode(out[prompt_len:])!r}",
      f"  reference: {tok.decode(reference)!r}",
    ]
  )

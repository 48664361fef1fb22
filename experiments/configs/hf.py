"""A pretrained Hugging Face model: the config `experiments.convert` gives a converted run.

  python -m experiments.convert --hf_dir=/path/to/SmolLM-135M --workdir=/tmp/smollm \
      --config.data.path=../shared/data/tinyshakespeare.txt

The model section is replaced by the imported architecture (only `model.scan_layers` and
`model.remat` are taken from here); the data section reads text with the checkpoint's own
tokenizer (`data.tokenizer="hf"`, `data.tokenizer_path` set to the model directory), causal
batches for a decoder, masked-LM batches for an encoder; the train section is a short fine-tune
(AdamW 2e-5 -> 2e-6, 20 warmup steps, no weight decay).

Fine-tune (continue training) a converted run in its own workdir, with its own config:

  python -m experiments.train --config=experiments/configs/hf.py:/tmp/smollm \
      --workdir=/tmp/smollm --config.train.steps=200

Variants: default; smoke (tiny batches and 4 steps, for tests); or a run directory, whose own
config.json is returned (so `train` sees exactly the converted model).
"""

import json
import os

import ml_collections

from reslm.training.config import get_base_config

VARIANTS = ("default", "smoke")


def get_config(arg: str | None = None):
  variant = arg or "default"
  if variant not in VARIANTS:
    path = os.path.join(os.path.expanduser(variant), "config.json")
    if not os.path.isfile(path):
      raise ValueError(
        f"hf variant {variant!r} is not known: neither a variant ({', '.join(VARIANTS)}) nor a run "
        "directory with a config.json"
      )
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  cfg = get_base_config()
  cfg.name = f"hf_{variant}"
  cfg.data.update(
    source="text",
    path="../shared/data/tinyshakespeare.txt",
    tokenizer="hf",
    seq_len=256,
    batch_size=8,
  )
  cfg.train.update(
    steps=200,
    learning_rate=2e-5,
    end_learning_rate=2e-6,
    warmup_steps=20,
    weight_decay=0.0,
    log_every=10,
    eval_every=100,
    eval_batches=10,
  )
  cfg.checkpoint.update(every=100, keep=2)
  if variant == "smoke":
    cfg.data.update(seq_len=32, batch_size=4)
    cfg.train.update(
      steps=4, warmup_steps=1, log_every=2, eval_every=2, eval_batches=2, progress_bar=False
    )
    cfg.checkpoint.every = 2
    cfg.report.update(measure_peak=False, peak_matmul_size=256)
  return cfg

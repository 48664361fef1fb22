"""A bidirectional encoder trained with BERT-style masked-LM on byte-level text.

  python -m experiments.train --config=experiments/configs/encoder_mlm.py \
      --workdir=/tmp/encoder_mlm --config.data.path=../shared/data/tinyshakespeare.txt

15% of positions are chosen per sequence (80% replaced by the mask token, 10% by a random token,
10% unchanged) and only they are scored. Variants: default (text, needs a file);
smoke (synthetic copy task, no files, a few seconds).
"""

from reslm.training.config import get_base_config

VARIANTS = ("default", "smoke")


def get_config(arg: str | None = None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(
      f"encoder_mlm variant {variant!r} is not known; choose one of: {', '.join(VARIANTS)}"
    )
  cfg = get_base_config()
  cfg.name = f"encoder_mlm_{variant}"
  cfg.data.update(
    source="text",
    path="../shared/data/tinyshakespeare.txt",
    tokenizer="byte",
    objective="mlm",
    mask_prob=0.15,
    seq_len=128,
    batch_size=32,
  )
  cfg.model.update(
    kind="encoder", d_model=128, num_layers=4, num_heads=4, max_seq_len=128, scan_layers=False
  )
  cfg.train.update(
    steps=2000,
    learning_rate=1e-3,
    end_learning_rate=1e-4,
    warmup_steps=100,
    log_every=50,
    eval_every=250,
    eval_batches=10,
    steps_per_call=10,
  )
  cfg.checkpoint.every = 1000
  if variant == "smoke":
    cfg.data.update(source="copy", path="", seq_len=32, batch_size=8, vocab_size=32)
    cfg.model.update(d_model=32, num_layers=2, num_heads=2, max_seq_len=32)
    cfg.train.update(
      steps=20,
      warmup_steps=2,
      log_every=5,
      eval_every=10,
      eval_batches=2,
      steps_per_call=1,
      progress_bar=False,
    )
    cfg.checkpoint.every = 10
    cfg.report.peak_matmul_size = 256
  return cfg

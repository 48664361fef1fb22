"""nanoGPT's CPU Shakespeare run, reproduced: a char-level decoder LM on Tiny Shakespeare.

  python -m experiments.train --config=experiments/configs/shakespeare_char.py \
      --workdir=/tmp/shakespeare_char --config.data.path=../shared/data/tinyshakespeare.txt

Same settings as nanoGPT's `config/train_shakespeare_char.py` CPU recipe: first 90% of the text
for training, last 10% for validation, vocabulary of the 65 characters, 4 layers, 4 heads, width 128,
context 64, batch 12, 2000 iterations, AdamW 1e-3 -> 1e-4 cosine with 100 warmup steps, β2 0.99,
weight decay 0.1, clipping 1.0, no dropout, eval every 250 steps on 20 batches. The architecture is
this codebase's (RMSNorm, RoPE, SwiGLU), not GPT-2's. Mixed precision: bf16 compute (this CPU's
AMX units run bf16 matmuls) with float32 parameters and optimizer state; `--config.model.dtype=float32`
for full precision. `experiments/benchmarks/shakespeare_char.py`
runs it and compares against nanoGPT's figures.

Variants: default; smoke (a few seconds, for tests).
"""

from reslm.training.config import get_base_config

VARIANTS = ("default", "smoke")


def get_config(arg: str | None = None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(
      f"shakespeare_char variant {variant!r} is not known; choose one of: {', '.join(VARIANTS)}"
    )
  cfg = get_base_config()
  cfg.name = f"shakespeare_char_{variant}"
  cfg.data.update(
    source="text",
    path="../shared/data/tinyshakespeare.txt",
    tokenizer="char",
    seq_len=64,
    batch_size=12,
    train_fraction=0.9,
  )
  cfg.model.update(
    d_model=128,
    num_layers=4,
    num_heads=4,
    max_seq_len=64,
    scan_layers=False,
    dtype="bfloat16",
    param_dtype="float32",
  )
  cfg.train.update(
    steps=2000,
    learning_rate=1e-3,
    end_learning_rate=1e-4,
    warmup_steps=100,
    decay_steps=2000,
    b1=0.9,
    b2=0.99,
    weight_decay=0.1,
    grad_clip=1.0,
    log_every=50,
    eval_every=250,
    eval_batches=20,
  )
  cfg.checkpoint.every = 1000
  if variant == "smoke":
    cfg.model.update(d_model=32, num_layers=2, num_heads=2)
    cfg.train.update(
      steps=20,
      warmup_steps=2,
      decay_steps=20,
      log_every=5,
      eval_every=10,
      eval_batches=2,
      progress_bar=False,
    )
    cfg.checkpoint.every = 10
    cfg.report.peak_matmul_size = 256
  return cfg

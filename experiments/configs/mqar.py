"""Multi-query associative recall (Zoology) with a small decoder LM: the embedded default run.

Needs no files or downloads; about two minutes on a 2-core CPU. Recall accuracy sits near
1 / num_kv_pairs (the model only knows which values are in context) until attention learns an
induction-style lookup, then jumps to ~100%: watch eval_accuracy.

  python -m experiments.train --config=experiments/configs/mqar.py --workdir=/tmp/mqar

Variants (`--config=experiments/configs/mqar.py:<variant>`):
  default  2 layers, width 64, 32 tokens, 4 key-value pairs, vocab 64, 2000 steps.
  smoke    a few seconds: width 32, 30 steps (used by tests and CI).
  long     4 layers, width 128, 256 tokens, 32 key-value pairs: the harder recall setting.
"""

from reslm.training.config import get_base_config

VARIANTS = ("default", "smoke", "long")


def get_config(arg: str | None = None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"mqar variant {variant!r} is not known; choose one of: {', '.join(VARIANTS)}")
  cfg = get_base_config()
  cfg.name = f"mqar_{variant}"
  cfg.data.source = "mqar"
  cfg.data.update(seq_len=32, batch_size=64, vocab_size=64)
  cfg.data.mqar.num_kv_pairs = 4
  cfg.model.update(d_model=64, num_layers=2, num_heads=4, max_seq_len=256, scan_layers=False)
  cfg.train.update(
    steps=2000,
    learning_rate=1e-3,
    end_learning_rate=1e-4,
    warmup_steps=50,
    weight_decay=0.0,
    log_every=100,
    eval_every=200,
    eval_batches=8,
    steps_per_call=10,
  )
  cfg.checkpoint.every = 500
  if variant == "smoke":
    cfg.data.update(seq_len=32, batch_size=8)
    cfg.model.update(d_model=32, num_layers=2, num_heads=2)
    cfg.train.update(
      steps=30,
      warmup_steps=5,
      log_every=5,
      eval_every=10,
      eval_batches=2,
      steps_per_call=1,
      progress_bar=False,
    )
    cfg.checkpoint.every = 10
    cfg.report.peak_matmul_size = 256
  elif variant == "long":
    cfg.data.update(seq_len=256, batch_size=32, vocab_size=256)
    cfg.data.mqar.num_kv_pairs = 32
    cfg.model.update(d_model=128, num_layers=4)
    cfg.train.update(steps=5000, eval_every=500, log_every=100)
  return cfg

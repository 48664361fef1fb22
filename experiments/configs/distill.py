"""Distil the Tiny Shakespeare char model into a student of half its width and depth.

Train the teacher (experiments/configs/shakespeare_char.py), then the student:

  python -m experiments.train --config=experiments/configs/shakespeare_char.py \
      --workdir=/tmp/shakespeare_char
  python -m experiments.train --config=experiments/configs/distill.py:white_box \
      --workdir=/tmp/distill_white_box --config.distill.teacher_workdir=/tmp/shakespeare_char

The student (width 64, 2 layers, 2 heads; the teacher has 128, 4, 4) keeps the teacher's data,
tokenizer, optimizer and steps, so its val loss compares directly with `scratch`, the same student
trained without a teacher. Rerunning a command resumes it, as for any run.

Variants:
  white_box (default): T^2-scaled KL to the teacher's logits at T=2, mixed 50/50 with label CE.
  hidden: white_box plus MSE between the student's two block outputs and the teacher's layers 2
    and 4, through learned 64 -> 128 projections.
  black_box: cross-entropy on 8192 sequences the teacher sampled from 4-character prefixes of
    the training text (saved as teacher_samples.npz in the workdir).
  scratch: the student alone (no distill section), the baseline.
  smoke: a tiny student of a `shakespeare_char.py:smoke` teacher, a few seconds (for tests).
"""

from experiments.configs import shakespeare_char
from reslm.compress import distill

VARIANTS = ("white_box", "hidden", "black_box", "scratch", "smoke")


def get_config(arg: str | None = None):
  variant = arg or "white_box"
  if variant not in VARIANTS:
    raise ValueError(
      f"distill variant {variant!r} is not known; choose one of: {', '.join(VARIANTS)}"
    )
  cfg = shakespeare_char.get_config("smoke" if variant == "smoke" else "default")
  cfg.name = f"distill_{variant}"
  if variant == "scratch":
    cfg.model.update(d_model=64, num_layers=2, num_heads=2)
    return cfg
  cfg.distill = distill.get_default_config()
  d = cfg.distill
  if variant == "smoke":
    cfg.model.update(d_model=16, num_layers=1, num_heads=2)
    d.teacher_workdir = "/tmp/shakespeare_char_smoke"
    d.black_box.update(num_sequences=48, batch_size=16)
    return cfg
  cfg.model.update(d_model=64, num_layers=2, num_heads=2)
  d.teacher_workdir = "/tmp/shakespeare_char"
  if variant == "hidden":
    d.update(hidden_weight=1.0, layer_map="1:2,2:4")
  elif variant == "black_box":
    d.mode = "black_box"
    d.black_box.update(num_sequences=8192, batch_size=256)
  return cfg

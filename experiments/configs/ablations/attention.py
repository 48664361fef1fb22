"""Attention variants in the same small decoder LM, equal step budget, MQAR and Tiny Shakespeare.

  python -m experiments.ablate --ablation=experiments/configs/ablations/attention.py \
      --workdir=/tmp/ablate_attention

`:smoke` runs every arm for a few steps on MQAR only (for tests). Arms whose variant is not
registered are reported as errors and the sweep continues. Rerun chosen arms with
`--arms=linear,mega` (a finished arm is reused: delete its <workdir>/<task>/<arm> to retrain it).
Linear, efficient and AFT run without RoPE (their papers' form; `rope=True` is an option).
"""

ARMS = {
  "dense": {"model.mixer": "dense"},
  "memory_efficient": {"model.mixer": "memory_efficient"},
  "flash": {"model.mixer": "flash"},
  "sliding_window_16": {"model.mixer": "sliding_window", "model.mixer_options": {"window": 16}},
  "linear": {"model.mixer": "linear"},
  "efficient": {"model.mixer": "efficient"},
  "aft_simple": {"model.mixer": "aft", "model.mixer_options": {"variant": "simple"}},
  # Buckets are padded to whole chunks, so on these 32/64-token tasks the defaults (8 buckets x
  # 64-token chunks) would attend over ~550 slots; 4 x 16 keeps the padding at <= 64 slots.
  "lsh": {"model.mixer": "lsh", "model.mixer_options": {"num_buckets": 4, "chunk_size": 16}},
  # Per-row random-key importance sampling (KDEformer, 'kde', is bidirectional only). The default
  # 32 samples would enumerate every key of a 32-token MQAR sequence (exact attention).
  "sampled_8": {"model.mixer": "sampled", "model.mixer_options": {"num_samples": 8}},
  "mega": {"model.mixer": "mega"},
}


def get_ablation(arg: str | None = None) -> dict:
  tasks = {
    "mqar": {
      "config": "experiments/configs/mqar.py",
      "overrides": {},
      "quality": "eval_accuracy",
      "higher_is_better": True,
    },
    "shakespeare": {
      "config": "experiments/configs/shakespeare_char.py",
      "overrides": {"data.path": "../shared/data/tinyshakespeare.txt", "model.dtype": "float32"},
      "quality": "eval_loss",
      "higher_is_better": False,
    },
  }
  arms = dict(ARMS)
  if arg == "smoke":
    tasks = {"mqar": {**tasks["mqar"], "config": "experiments/configs/mqar.py:smoke"}}
    arms = {k: arms[k] for k in ("dense", "sliding_window_16")}
  elif arg is not None:
    raise ValueError(f"attention ablation argument {arg!r} is not known; use smoke or nothing")
  return {"tasks": tasks, "arms": arms, "cost": "flops_per_token"}

"""Post-training quantization of a trained run, one variant per method (and one mixed recipe).

  python -m experiments.compress --config=experiments/configs/compress/quantize.py:<variant> \
      --workdir=/tmp/shakespeare_char --out=/tmp/shakespeare_char_<variant>

(--workdir: a run trained by `experiments.train`, e.g. experiments/configs/shakespeare_char.py.)

Variants (weights of every projection unless said otherwise; embeddings stay float):
  int8       round-to-nearest int8, per output channel
  int4       round-to-nearest int4, groups of 64 input rows
  nf4        NF4 with double quantization (QLoRA), blocks of 64
  gptq4      GPTQ int4, groups of 64, act-order
  awq4       AWQ int4, groups of 64
  w8a8       SmoothQuant W8A8 (α = 0.5): int8 weights and per-token int8 activations
  llm_int8   LLM.int8: outlier features (|x| > 6) in float, the rest int8 x int8
  mixed      (default) int4 GPTQ on the MLPs, W8A8 on attention, int8 KV cache
  smoke      mixed on 4 calibration sequences and 2 eval batches (seconds, for tests)
"""

import ml_collections

from reslm.compress.pipeline import get_default_config

VARIANTS = ("int8", "int4", "nf4", "gptq4", "awq4", "w8a8", "llm_int8", "mixed", "smoke")
ALL = r".*"
MLP = r".*/mlp/.*"
ATTENTION = r".*/mixer/(q|k|v|o)"


def _rules(variant: str) -> list[dict]:
  one = {
    "int8": ("int8", {}),
    "int4": ("int4", {"group_size": 64}),
    "nf4": ("nf4", {"block_size": 64}),
    "gptq4": ("gptq", {"bits": 4, "group_size": 64, "act_order": True}),
    "awq4": ("awq", {"bits": 4, "group_size": 64}),
    "w8a8": ("smoothquant", {"alpha": 0.5}),
    "llm_int8": ("llm_int8", {"threshold": 6.0}),
  }
  if variant in one:
    method, settings = one[variant]
    return [{"path": ALL, "method": method, "settings": settings}]
  return [
    {"path": MLP, "method": "gptq", "settings": {"bits": 4, "group_size": 64}},
    {"path": ATTENTION, "method": "smoothquant", "settings": {"alpha": 0.5}},
    {"path": r".*/mixer", "method": "kv_int8"},
  ]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "mixed"
  if variant not in VARIANTS:
    raise ValueError(
      f"compress/quantize variant {variant!r} is not known; choose one of: {', '.join(VARIANTS)}"
    )
  cfg = get_default_config()
  cfg.name = f"quantize_{variant}"
  cfg.rules = _rules(variant)
  if variant == "smoke":
    cfg.calibration.update(num_sequences=4, batch_size=4, max_tokens=256)
    cfg.eval_batches = 2
  return cfg

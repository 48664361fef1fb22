"""Structured pruning of a trained run: whole attention heads and MLP neurons (LLM-Pruner style).

  python -m experiments.compress --config=experiments/configs/compress/structured.py:<variant> \
      --workdir=/tmp/shakespeare_char --out=/tmp/shakespeare_char_<variant>

(--workdir: a run trained by `experiments.train`, e.g. experiments/configs/shakespeare_char.py.)

The model is rebuilt with fewer heads / a smaller mlp_dim (every layer loses the same number,
each its own least important units); see `compress.prune.structured`. Importance is the
first-order Taylor score Σ|w · ∂L/∂w| on the calibration sequences unless said otherwise.

Variants (ratios of the heads, i.e. KV groups, and of the MLP neurons removed in every layer):
  heads25                    25% of the heads
  heads50                    50% of the heads
  neurons25                  25% of the MLP neurons
  neurons50                  50% of the MLP neurons
  heads25_neurons25          (default) both
  heads25_neurons25_mag      both, by weight magnitude (L2 norm per unit): the data-free baseline
  heads25_neurons25_recover  both, then 200 steps of recovery fine-tuning (peak lr 3e-4)
  heads25_neurons25_int8     both, then int8 round-to-nearest on every projection
  smoke                      50% heads, 25% neurons, 2 recovery steps, 4 calibration sequences
                             and 2 eval batches (seconds, for tests)
"""

import ml_collections

from reslm.compress.pipeline import get_default_config

VARIANTS = (
  "heads25",
  "heads50",
  "neurons25",
  "neurons50",
  "heads25_neurons25",
  "heads25_neurons25_mag",
  "heads25_neurons25_recover",
  "heads25_neurons25_int8",
  "smoke",
)
# The projections of every attention mixer / MLP (so the report counts their bytes).
HEADS = r".*/mixer/.*"
NEURONS = r".*/mlp/.*"
BOTH = r".*/(mixer|mlp)/.*"


def _rules(variant: str) -> list[dict]:
  path, settings = {
    "heads25": (HEADS, {"heads": 0.25}),
    "heads50": (HEADS, {"heads": 0.5}),
    "neurons25": (NEURONS, {"neurons": 0.25}),
    "neurons50": (NEURONS, {"neurons": 0.5}),
    "heads25_neurons25": (BOTH, {"heads": 0.25, "neurons": 0.25}),
    "heads25_neurons25_mag": (BOTH, {"heads": 0.25, "neurons": 0.25, "criterion": "magnitude"}),
    "heads25_neurons25_recover": (
      BOTH,
      {"heads": 0.25, "neurons": 0.25, "recover_steps": 200, "recover_lr": 3e-4},
    ),
    "heads25_neurons25_int8": (BOTH, {"heads": 0.25, "neurons": 0.25}),
    "smoke": (BOTH, {"heads": 0.5, "neurons": 0.25, "recover_steps": 2, "recover_lr": 3e-4}),
  }[variant]
  rules = [{"path": path, "method": "structured", "settings": settings}]
  if variant.endswith("_int8"):
    rules.append({"path": r".*", "method": "int8"})
  return rules


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "heads25_neurons25"
  if variant not in VARIANTS:
    raise ValueError(
      f"compress/structured variant {variant!r} is not known; choose one of: {', '.join(VARIANTS)}"
    )
  cfg = get_default_config()
  cfg.name = f"structured_{variant}"
  cfg.rules = _rules(variant)
  if variant == "smoke":
    cfg.calibration.update(num_sequences=4, batch_size=4, max_tokens=256)
    cfg.eval_batches = 2
  return cfg

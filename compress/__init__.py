"""Model compression as rules: regex over module paths -> method + settings (see `compress.rules`).

  from reslm.compress import apply_rules, capture_inputs, make_plan
  plan = make_plan(model, [{"path": r".*/mlp/.*", "method": "gptq", "settings": {"bits": 4}}])
  x = capture_inputs(model, plan.calibration_targets(), tokens)
  apply_plan(model, plan, x)

Methods register by name in `compress.registry` (quantization in `compress.quantize`); a new
family (pruning, low-rank, distillation) registers its own and is imported here.
"""

from reslm.compress import asvd, distill, lowrank, prune, quantize  # noqa: F401  (register methods)
from reslm.compress.calibration import calibration_tokens, capture_inputs
from reslm.compress.checkpoint import load_compressed, save_compressed
from reslm.compress.intercept import unfused_projections
from reslm.compress.layers import Compressed, CompressedLinear
from reslm.compress.registry import METHODS, Dense, Replacement, register
from reslm.compress.rules import apply_plan, apply_rules, make_plan, parse_rules
from reslm.compress.targets import find_targets

__all__ = [
  "METHODS",
  "Compressed",
  "CompressedLinear",
  "Dense",
  "Replacement",
  "apply_plan",
  "apply_rules",
  "calibration_tokens",
  "capture_inputs",
  "find_targets",
  "load_compressed",
  "make_plan",
  "parse_rules",
  "register",
  "save_compressed",
  "unfused_projections",
]

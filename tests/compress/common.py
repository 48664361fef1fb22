"""One small model shape for every compress test (shared shapes share compilations).

Two block groups of two blocks: blocks/0 holds layers 0 and 2, blocks/1 layers 1 and 3.
"""

import math

import numpy as np

from reslm.models import ModelConfig

CFG = ModelConfig(
  vocab_size=64, d_model=32, num_layers=4, num_heads=4, mixer="dense,dense", tie_embeddings=False
)


def random_calibration(plan, tokens: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
  """Calibration inputs shaped as `capture_inputs` gives them ([*layers, tokens, K]), random for
  speed: one float32 array per target of the plan that needs calibration."""
  rng = np.random.default_rng(seed)
  return {
    t.name: rng.normal(size=(*t.lead, tokens, math.prod(t.in_shape))).astype(np.float32)
    for t in plan.calibration_targets()
  }

"""Attention variants, one file per family, all behind the `Attention` interface.

Importing this package registers every variant in `models.registry.MIXERS`:
exact (dense, memory_efficient, flash, sliding_window), linear-time (linear, efficient, aft) and
approximate (lsh, kde (KDEformer, bidirectional only), sampled (random keys per row), mega).
"""

from reslm.models.attention import (  # noqa: F401  (registration)
  aft,
  efficient,
  flash,
  kde,
  linear,
  lsh,
  mega,
  memory_efficient,
  sampled,
  sliding_window,
)
from reslm.models.attention.base import Attention, MaskInfo, reference_attention
from reslm.models.attention.dense import DenseAttention

__all__ = ["Attention", "DenseAttention", "MaskInfo", "reference_attention"]

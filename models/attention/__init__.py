"""Attention variants, one file per family, all behind the `Attention` interface.

Importing this package registers every variant in `models.registry.MIXERS`.
"""

from models.attention.base import Attention, MaskInfo, reference_attention
from models.attention.dense import DenseAttention

__all__ = ["Attention", "DenseAttention", "MaskInfo", "reference_attention"]

"""Flash attention (FlashAttention-2) as Pallas kernels for TPU and GPU, with a jnp reference.

Use `kernels_pallas.flash_attention.api.flash_attention`; see `api.py` for the dispatch.
"""

from reslm.kernels_pallas.flash_attention.api import RESIDUAL_NAMES, flash_attention
from reslm.kernels_pallas.flash_attention.config import BlockSizes
from reslm.kernels_pallas.flash_attention.reference import reference

__all__ = ["RESIDUAL_NAMES", "BlockSizes", "flash_attention", "reference"]

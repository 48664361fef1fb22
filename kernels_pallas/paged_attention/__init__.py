"""Paged-attention decode (GQA, optional int8 KV) as Pallas kernels for TPU and GPU.

Use `paged_attention` from `api.py`; `reference.py` gathers the pages and runs dense attention.
"""

from reslm.kernels_pallas.paged_attention.api import paged_attention
from reslm.kernels_pallas.paged_attention.config import BlockSizes
from reslm.kernels_pallas.paged_attention.reference import paged_attention as reference

__all__ = ["BlockSizes", "paged_attention", "reference"]

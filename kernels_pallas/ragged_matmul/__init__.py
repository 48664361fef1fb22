"""Grouped (ragged) matmul for mixture-of-experts as Pallas kernels for TPU and GPU.

Use `ragged_matmul` from `api.py`; `reference.py` is `jax.lax.ragged_dot` in float32.
"""

from reslm.kernels_pallas.ragged_matmul.api import ragged_matmul
from reslm.kernels_pallas.ragged_matmul.config import BlockSizes
from reslm.kernels_pallas.ragged_matmul.reference import ragged_matmul as reference

__all__ = ["BlockSizes", "ragged_matmul", "reference"]

"""Low-bit matmuls (int8 and packed-int4 weights, W8A8) as Pallas kernels for TPU and GPU.

Use `int8_matmul`, `int4_matmul` and `int8_int8_matmul` from `api.py`; `packing.py` holds the
quantizers and the int4 packing (low nibble = even K row, high nibble = odd K row).
"""

from reslm.kernels_pallas.quant_matmul.api import int4_matmul, int8_int8_matmul, int8_matmul
from reslm.kernels_pallas.quant_matmul.config import BlockSizes
from reslm.kernels_pallas.quant_matmul.packing import (
  pack_int4,
  quantize_int4,
  quantize_int8,
  quantize_rows_int8,
  unpack_int4,
)

__all__ = [
  "BlockSizes",
  "int4_matmul",
  "int8_int8_matmul",
  "int8_matmul",
  "pack_int4",
  "quantize_int4",
  "quantize_int8",
  "quantize_rows_int8",
  "unpack_int4",
]

"""Quantization methods (registered on import) and the quantized layers they produce.

int8, int4, nf4       round-to-nearest weight-only (`rtn`, formats in `formats`)
gptq                  second-order, Cholesky of H⁻¹, lazy batched updates, act-order (`gptq`)
awq                   activation-aware per-channel scale search (`awq`)
smoothquant           W8A8 with int8 x int8 -> int32 matmuls (`activation`)
llm_int8              outlier features in float, the rest int8 x int8 (`activation`)
kv_int8               int8 KV cache for decoding (`kv_cache`)
"""

from reslm.compress.quantize import activation, awq, gptq, kv_cache, rtn
from reslm.compress.quantize.layers import (
  Int4Linear,
  Int8Linear,
  NF4Linear,
  OutlierInt8Linear,
  W8A8Linear,
)

__all__ = [
  "Int4Linear",
  "Int8Linear",
  "NF4Linear",
  "OutlierInt8Linear",
  "W8A8Linear",
  "activation",
  "awq",
  "gptq",
  "kv_cache",
  "rtn",
]

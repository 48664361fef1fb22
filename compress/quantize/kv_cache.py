"""int8 KV cache for decoding: keys and values stored as int8 with one scale per token and head.

The cache of a softmax attention mixer grows with the context; int8 codes plus a float32 scale per
(token, kv head) take d + 4 bytes per head instead of 2d (bfloat16) or 4d (float32). Values are
quantized when written (scale = max|x| / 127 over head_dim). Exact-softmax mixers (dense, flash,
memory_efficient, sliding_window) attend from the codes (q·k as (q·codes)·scale, value scales
folded into the softmax weights), so no float copy of the cache is made per step; other mixers
dequantize the cache when attending. The code path lives in `models.attention.base`
(`Attention.kv_cache_quant`, `int8_attention`); this method turns it on for the mixers a rule
selects. It changes no parameter, only what `init_cache` allocates.
"""

from reslm.compress.registry import register
from reslm.models.attention.base import Attention


@register("kv_int8", stage="quantize", target="attention", per_layer=False)
def _kv_int8(model, targets, calibration, settings):
  """Sets `kv_cache_quant = "int8"` on each selected mixer; returns the manifest entries."""
  del model, calibration, settings
  entries = []
  for t in targets:
    if type(t.module).init_cache is not Attention.init_cache:
      raise ValueError(
        f"kv_int8 needs a mixer with the shared softmax KV cache; {t.name} is a "
        f"{type(t.module).__name__} with its own decoding state"
      )
    t.module.kv_cache_quant = "int8"
    entries.append({"path": list(t.path), "attribute": "kv_cache_quant", "value": "int8"})
  return entries

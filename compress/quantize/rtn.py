"""Round-to-nearest weight-only methods: int8 (per channel), int4 (group-wise), NF4 (QLoRA).

Each needs no calibration: the weights alone decide the scales (`compress.quantize.formats`).
"""

import jax

from reslm.compress.quantize import formats
from reslm.compress.quantize.layers import Int4Linear, Int8Linear, NF4Linear
from reslm.compress.registry import BOOL, Replacement, integer, one_of, register


def int8_replacement(q_kn, scales, input_scale=None) -> Replacement:
  arrays = {"w_q": q_kn, "scales": scales}
  if input_scale is not None:
    arrays["input_scale"] = input_scale
  return Replacement(Int8Linear, arrays, {})


def int4_replacement(q_kn, scales, group_size: int, input_scale=None) -> Replacement:
  """From int4 values q [Kp, N] (Kp a multiple of group_size) and scales [Kp / g, N]."""
  arrays = {"w_packed": formats.pack_int4(q_kn), "scales": scales}
  if input_scale is not None:
    arrays["input_scale"] = input_scale
  return Replacement(Int4Linear, arrays, {"group_size": group_size})


def quantize_dequantize(w_kn: jax.Array, bits: int, group_size: int) -> jax.Array:
  """RTN then back to float32 [K, N] (int8 per channel, int4 per group)."""
  if bits == 8:
    q, s = formats.quantize_int8(w_kn)
    return q * s
  q, s = formats.quantize_int4(w_kn, group_size)
  return formats.dequantize_int4(formats.pack_int4(q), s, group_size, w_kn.shape[0])


@register("int8", stage="quantize")
def _int8(w_kn, x_mk, settings):
  """Weight-only int8 with one scale per output channel."""
  del x_mk, settings
  return int8_replacement(*formats.quantize_int8(w_kn))


@register(
  "int4",
  stage="quantize",
  defaults={"group_size": 128},
  checks={"group_size": one_of(*formats.GROUP_SIZES)},
)
def _int4(w_kn, x_mk, settings):
  """Weight-only int4, one scale per `group_size` input rows and output channel."""
  del x_mk
  g = settings["group_size"]
  q, scales = formats.quantize_int4(w_kn, g)
  return int4_replacement(q, scales, g)


@register(
  "nf4",
  stage="quantize",
  defaults={"block_size": 64, "double_quant": True, "dq_block": 256},
  checks={
    "block_size": one_of(*formats.GROUP_SIZES),
    "double_quant": BOOL,
    "dq_block": integer(1),
  },
)
def _nf4(w_kn, x_mk, settings):
  """NF4 (4-bit normal-float levels) with block absmax, optionally double-quantized."""
  del x_mk
  arrays = formats.quantize_nf4(
    w_kn,
    settings["block_size"],
    double_quant=settings["double_quant"],
    dq_block=settings["dq_block"],
  )
  static = {"block_size": settings["block_size"], "dq_block": settings["dq_block"]}
  return Replacement(NF4Linear, arrays, static)

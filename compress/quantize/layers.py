"""Quantized projections: drop-in replacements for `Linear` / `ProjectOut` (see `compress.layers`).

  Int8Linear         weight-only int8, per-output-channel scales (RTN, GPTQ, AWQ at 8 bits)
  Int4Linear         weight-only int4 packed two per byte, group-wise scales (RTN, GPTQ, AWQ)
  NF4Linear          weight-only NF4 with (optionally double-quantized) block absmax (QLoRA)
  W8A8Linear         int8 weights x int8 per-token activations -> int32 (SmoothQuant)
  OutlierInt8Linear  LLM.int8: outlier input features in float, the rest int8 x int8

`input_scale` (optional, [K]) multiplies the input before the matmul: AWQ keeps its 1/s there and
SmoothQuant its smoothing 1/s, since the layer that produces x (a norm, another projection) is not
known in general; folding it into that layer's weights would save the [K] multiply.

The int8 / int4 / int8 x int8 products run through `kernels_pallas.quant_matmul` (Pallas on
TPU / GPU, its jnp reference on CPU; see `compress.quantize.matmul`); NF4 is dequantized and
multiplied in float32.

Axes: w [K, N] as ("in", "out") of the replaced kernel; scales ("out",) or (None, "out").
"""

import jax.numpy as jnp

from reslm.compress.layers import CompressedLinear
from reslm.compress.quantize import formats, matmul


def _scaled(layer, x_mk):
  """x * input_scale (if the layer has one), in a dtype the kernels take (float32 / bfloat16)."""
  if "input_scale" in layer.array_names:
    return x_mk.astype(jnp.float32) * layer.input_scale[...]
  return x_mk if x_mk.dtype in (jnp.float32, jnp.bfloat16) else x_mk.astype(jnp.float32)


def _axes(layer) -> dict:
  """The weight's logical axes, for the kernels' per-device split under a mesh."""
  return {"in_axis": layer.in_axis, "out_axis": layer.out_axis}


def _unscale(arrays, w_kn):
  """The effective weight diag(input_scale) W."""
  if "input_scale" in arrays:
    return arrays["input_scale"].astype(jnp.float32)[:, None] * w_kn
  return w_kn


class Int8Linear(CompressedLinear, kind="int8"):
  """y = ((x * input_scale) @ w_q) * scales."""

  ARRAYS = {"w_q": ("in", "out"), "scales": ("out",), "input_scale": ("in",)}
  OPTIONAL = frozenset({"input_scale"})

  def matmul(self, x_mk):
    x = _scaled(self, x_mk)
    return matmul.int8_matmul(
      x, self.w_q[...], self.scales[...], out_dtype=self.dtype, **_axes(self)
    )

  @classmethod
  def weight(cls, arrays, static, k):
    return _unscale(arrays, arrays["w_q"].astype(jnp.float32) * arrays["scales"])


class Int4Linear(CompressedLinear, kind="int4"):
  """y = (x * input_scale) @ (unpack(w_packed) * scales[group]); K padded to the group size."""

  ARRAYS = {"w_packed": ("in", "out"), "scales": (None, "out"), "input_scale": ("in",)}
  OPTIONAL = frozenset({"input_scale"})
  STATIC = {"group_size": 64}

  def matmul(self, x_mk):
    x = _scaled(self, x_mk)
    return matmul.int4_matmul(
      x,
      self.w_packed[...],
      self.scales[...],
      group_size=self.group_size,
      out_dtype=self.dtype,
      **_axes(self),
    )

  @classmethod
  def weight(cls, arrays, static, k):
    w = formats.dequantize_int4(arrays["w_packed"], arrays["scales"], static["group_size"], k)
    return _unscale(arrays, w)


class NF4Linear(CompressedLinear, kind="nf4"):
  """y = x @ (nf4_code[codes] * absmax[block]); dequantized on the fly (no NF4 kernel)."""

  ARRAYS = {
    "codes": ("in", "out"),
    "absmax": (None, "out"),
    "absmax_q": (None, "out"),
    "absmax_scale": (None,),
    "absmax_mean": (),
  }
  OPTIONAL = frozenset({"absmax", "absmax_q", "absmax_scale", "absmax_mean"})
  STATIC = {"block_size": 64, "dq_block": 256}

  def matmul(self, x_mk):
    w = self.dense_weight()
    return jnp.matmul(x_mk.astype(jnp.float32), w, preferred_element_type=jnp.float32)

  @classmethod
  def weight(cls, arrays, static, k):
    return formats.dequantize_nf4(arrays, static["block_size"], k, dq_block=static["dq_block"])


class W8A8Linear(CompressedLinear, kind="w8a8"):
  """y = int8(x * input_scale) @ w_q in int32, times the token's and the channel's scales.

  Activations are quantized per token (row) at run time: scale = max |x_row| / 127.
  """

  ARRAYS = {"w_q": ("in", "out"), "w_scale": ("out",), "input_scale": ("in",)}
  OPTIONAL = frozenset({"input_scale"})

  def matmul(self, x_mk):
    x_q, x_scale = formats.quantize_rows_int8(_scaled(self, x_mk))
    return matmul.int8_int8_matmul(
      x_q, self.w_q[...], x_scale, self.w_scale[...], out_dtype=self.dtype, **_axes(self)
    )

  @classmethod
  def weight(cls, arrays, static, k):
    return _unscale(arrays, arrays["w_q"].astype(jnp.float32) * arrays["w_scale"])


class OutlierInt8Linear(CompressedLinear, kind="llm_int8"):
  """LLM.int8 (Dettmers et al. 2022): outlier feature columns of x in float, the rest int8.

  y = x[:, idx] @ w_outlier + int8(x with columns idx zeroed) @ w_q, int32 accumulation. The
  outlier features `idx` are fixed from calibration (they are systematic per feature dimension);
  unused slots hold idx = K and select nothing.
  """

  ARRAYS = {
    "w_q": ("in", "out"),
    "w_scale": ("out",),
    "outlier_idx": (None,),
    "outlier_w": (None, "out"),
  }

  def matmul(self, x_mk):
    x = x_mk.astype(jnp.float32)
    idx = self.outlier_idx[...]
    x_out = jnp.take(x, idx, axis=1, mode="fill", fill_value=0)  # [M, slots]
    # Stored in bfloat16 or float32; multiplied in float32 (XLA:CPU has no bf16 x bf16 -> f32 dot).
    y_out = x_out @ self.outlier_w[...].astype(jnp.float32)
    keep = jnp.ones((x.shape[1],), jnp.float32).at[idx].set(0.0, mode="drop")
    x_q, x_scale = formats.quantize_rows_int8(x * keep)
    y_in = matmul.int8_int8_matmul(x_q, self.w_q[...], x_scale, self.w_scale[...], **_axes(self))
    return (y_out + y_in).astype(self.dtype)

  @classmethod
  def weight(cls, arrays, static, k):
    w = arrays["w_q"].astype(jnp.float32) * arrays["w_scale"]
    return w.at[arrays["outlier_idx"]].set(arrays["outlier_w"].astype(jnp.float32), mode="drop")

"""The public low-bit matmuls: checks, a custom VJP, and the per-platform dispatch.

`implementation="auto"` stages every backend with `jax.lax.platform_dependent` (TPU kernel on
"tpu", GPU kernel on "cuda", the jnp reference anywhere else, e.g. CPU): the choice is made when the
program is lowered, never by asking which device is live at trace time, so one function exports
for TPU and for CUDA from a CPU host (one platform per export).

Weights and scales are frozen: they pass through `lax.stop_gradient`, so no gradient reaches them.
`int8_matmul` and `int4_matmul` are differentiable in x by a `jax.custom_vjp` whose backward is a
kernel too (dx = g · (w ∘ s)ᵀ); the kernels themselves are never differentiated. `int8_int8_matmul`
has integer inputs and no gradient.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from reslm.kernels_pallas import base
from reslm.kernels_pallas.quant_matmul import reference, tpu
from reslm.kernels_pallas.quant_matmul.config import (
  BlockSizes,
  QuantConfig,
  gpu_tiles,
  make_config,
  tpu_tiles,
)

__all__ = ["BlockSizes", "int4_matmul", "int8_int8_matmul", "int8_matmul"]


def int8_matmul(
  x: jax.Array,
  w_q: jax.Array,
  scales: jax.Array,
  *,
  out_dtype=None,
  block_sizes: BlockSizes | None = None,
  implementation: str = "auto",
  interpret=False,
) -> jax.Array:
  """x times int8 weights with a per-output-channel scale: (x @ w_q) * scales.

  Args:
    x: Activations [..., K], float32 or bfloat16.
    w_q: int8 weights [K, N].
    scales: Float scales [N] (one per output channel), applied once after the K reduction.
    out_dtype: Output dtype (float32 or bfloat16); default x's dtype.
    block_sizes: Tile sizes (`BlockSizes`); None fields take the backend default.
    implementation: "auto" (per-platform dispatch), "tpu", "gpu" or "reference".
    interpret: Run the Pallas kernels in interpret mode (CPU tests): True, or a
      `pltpu.InterpretParams` for the TPU simulator.

  Returns:
    [..., N] in out_dtype; differentiable in x only.

  Raises:
    ValueError: One line, for bad shapes, dtypes, arguments or block sizes (before lowering).
  """
  cfg = make_config(
    "int8", x, w_q, scales, group_size=0, out_dtype=out_dtype, block_sizes=block_sizes,
    implementation=implementation, interpret=interpret,
  )  # fmt: skip
  return _float_call(cfg, x, w_q, scales)


def int4_matmul(
  x: jax.Array,
  w_packed: jax.Array,
  scales: jax.Array,
  *,
  group_size: int,
  out_dtype=None,
  block_sizes: BlockSizes | None = None,
  implementation: str = "auto",
  interpret=False,
) -> jax.Array:
  """x times packed int4 weights with group-wise scales: Σ_g (x_g @ w_g) * scales[g].

  Args:
    x: Activations [..., K], float32 or bfloat16.
    w_packed: int8 [K / 2, N] from `packing.pack_int4` (low nibble = even K row, high = odd).
    scales: Float scales [K / group_size, N]; each multiplies its group's float32 partial product.
    group_size: K rows per scale: 32, 64 or 128 (must divide K).
    out_dtype, block_sizes, implementation, interpret: As for `int8_matmul`.

  Returns:
    [..., N] in out_dtype; differentiable in x only.

  Raises:
    ValueError: One line, for bad shapes, dtypes, arguments or block sizes (before lowering).
  """
  cfg = make_config(
    "int4", x, w_packed, scales, group_size=group_size, out_dtype=out_dtype,
    block_sizes=block_sizes, implementation=implementation, interpret=interpret,
  )  # fmt: skip
  return _float_call(cfg, x, w_packed, scales)


def int8_int8_matmul(
  x_q: jax.Array,
  w_q: jax.Array,
  x_scale: jax.Array | None = None,
  w_scale: jax.Array | None = None,
  *,
  out_dtype=jnp.float32,
  block_sizes: BlockSizes | None = None,
  implementation: str = "auto",
  interpret=False,
) -> jax.Array:
  """W8A8: int8 [..., K] x int8 [K, N] accumulated exactly in int32, then scaled.

  Args:
    x_q: int8 activations [..., K] (e.g. from `packing.quantize_rows_int8`).
    w_q: int8 weights [K, N].
    x_scale: Float [...] per-row scales, or None (then w_scale must be None too).
    w_scale: Float [N] per-column scales, or None.
    out_dtype: float32 or bfloat16 (ignored without scales).
    block_sizes, implementation, interpret: As for `int8_matmul`.

  Returns:
    int32 [..., N] (x_q @ w_q) without scales, else (x_q @ w_q) * x_scale[..., None] * w_scale in
    out_dtype. No gradient flows through it (scales are treated as constants).

  Raises:
    ValueError: One line, for bad shapes, dtypes, arguments or block sizes (before lowering).
  """
  cfg = make_config(
    "int8_int8", x_q, w_q, w_scale, group_size=0, out_dtype=out_dtype, block_sizes=block_sizes,
    implementation=implementation, interpret=interpret, x_scale=x_scale,
  )  # fmt: skip
  _check_tiles(cfg)
  x2 = x_q.reshape(cfg.m, cfg.k)
  if cfg.has_scales:
    xs, ws = lax.stop_gradient(x_scale.reshape(cfg.m)), lax.stop_gradient(w_scale)
    out = _dispatch(cfg, "matmul", x2, w_q, ws, xs)
  else:
    out = _dispatch(cfg, "matmul", x2, w_q, None, None)
  return out.reshape(*x_q.shape[:-1], cfg.n)


def _check_tiles(cfg: QuantConfig):
  """Raises block-size errors of the backends that can run, before anything is traced."""
  if cfg.implementation in ("tpu", "auto"):
    tpu_tiles(cfg)
  if cfg.implementation in ("gpu", "auto"):
    gpu_tiles(cfg)


def _float_call(cfg: QuantConfig, x, w, scales):
  _check_tiles(cfg)
  w, scales = lax.stop_gradient(w), lax.stop_gradient(scales)
  out = _matmul(cfg, x.reshape(cfg.m, cfg.k), w, scales)
  return out.reshape(*x.shape[:-1], cfg.n)


def _gpu():
  from reslm.kernels_pallas.quant_matmul import gpu  # noqa: PLC0415 (Triton only when needed)

  return gpu


def _reference_matmul(cfg: QuantConfig, x, w, scales, x_scale=None):
  if cfg.kind == "int8":
    return reference.int8_matmul(x, w, scales, out_dtype=cfg.out_dtype)
  if cfg.kind == "int4":
    return reference.int4_matmul(x, w, scales, group_size=cfg.group_size, out_dtype=cfg.out_dtype)
  return reference.int8_int8_matmul(x, w, x_scale, scales, out_dtype=cfg.out_dtype)


def _reference_matmul_dx(cfg: QuantConfig, g, w, scales):
  """dx = g · (w ∘ s)ᵀ in float32, cast to x's dtype."""
  if cfg.kind == "int8":
    w_f32 = reference.dequantize_int8(w, scales)
  else:
    w_f32 = reference.dequantize_int4(w, scales, cfg.group_size)
  dx = jnp.matmul(g.astype(jnp.float32), w_f32.T, precision=lax.Precision.HIGHEST)
  return dx.astype(cfg.x_dtype)


def _dispatch(cfg: QuantConfig, which: str, *args):
  """Calls `which` ("matmul" or "matmul_dx") of the configured backend."""
  ref = _reference_matmul if which == "matmul" else _reference_matmul_dx
  return base.dispatch(
    cfg.implementation,
    args,
    reference=base.bind(ref, cfg),
    tpu=base.bind(getattr(tpu, which), cfg),
    gpu=lambda: base.bind(getattr(_gpu(), which), cfg),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul(cfg: QuantConfig, x, w, scales):
  return _dispatch(cfg, "matmul", x, w, scales)


def _matmul_fwd(cfg: QuantConfig, x, w, scales):
  return _dispatch(cfg, "matmul", x, w, scales), (w, scales)


def _matmul_bwd(cfg: QuantConfig, residuals, g):
  w, scales = residuals
  return _dispatch(cfg, "matmul_dx", g, w, scales), None, None


_matmul.defvjp(_matmul_fwd, _matmul_bwd)

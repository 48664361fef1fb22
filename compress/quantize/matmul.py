"""The low-bit matmuls the quantized layers compute through: `kernels_pallas.quant_matmul`.

  int8_matmul:       (x @ w_q) * scales                        weight-only, per-output-channel
  int4_matmul:       x @ (unpack(w_packed) * group scales)      weight-only, group-wise
  int8_int8_matmul:  int32 acc = x_q @ w_q (exact), then acc * x_scale[m] * w_scale[n]

`implementation="auto"` picks the Pallas kernel on TPU / GPU and the kernels' jnp reference
elsewhere (CPU), per platform when the program is lowered. The storage formats are the kernels'
(`compress.quantize.formats` writes them). The quantized layers may keep K unpadded for int4 (the
kernel wants K a multiple of the group size): x then gets zero columns.

Under a mesh (a program partitioned over devices) XLA cannot partition the Mosaic kernels, so each
call runs per device in a `shard_map` over every mesh axis (`models.sharding.per_device`), placed
by the active logical-axis rules: the token rows as "batch" is split; the weight's N columns as its
output axis (`out_axis`, e.g. "mlp" or "heads" over `tensor`: column-parallel, no collective); its
K rows as its input axis (`in_axis`, row-parallel: each device's partial product is summed over
those axes with one `psum`, in float32 or int32). Mesh axes already splitting the rows (FSDP's
`fsdp` on "embed") gather the weight, as FSDP gathers any weight where it is used.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from reslm.kernels_pallas.quant_matmul import api
from reslm.models import sharding


def _layout(m: int, k: int, n: int, in_axis, out_axis, k_multiple: int = 1):
  """(mesh, manual axes, row axes, K axes, N axes) of a per-device call; None without a mesh.

  K is split only where every shard keeps a multiple of `k_multiple` rows (int4 groups).
  """
  found = sharding.kernel_mesh()
  if found is None:
    return None
  mesh, free = found
  rows = sharding.kernel_split("batch", m)
  k_axes = sharding.kernel_split(in_axis, k, taken=rows)
  if k_axes and (k // math.prod(mesh.shape[a] for a in k_axes)) % k_multiple:
    k_axes = ()
  n_axes = sharding.kernel_split(out_axis, n, taken=rows + k_axes)
  return mesh, free, rows, k_axes, n_axes


def _per_device(call, layout, args, arg_dims, out_dtype):
  """call(*args) on each device's shards; partial products summed over the K axes.

  Args:
    call: (out_dtype, *args) -> [M, N]; run per shard.
    layout: From `_layout`.
    args: Operands.
    arg_dims: Per operand, which of "m", "k", "n" each dimension is (None = whole).
    out_dtype: The result dtype; partial sums are formed in float32 (int32 stays int32).
  """
  mesh, free, rows, k_axes, n_axes = layout
  entry = {
    "m": sharding.spec_entry(rows),
    "k": sharding.spec_entry(k_axes),
    "n": sharding.spec_entry(n_axes),
  }
  in_specs = tuple(P(*(entry.get(d) for d in dims)) for dims in arg_dims)
  partial_dtype = out_dtype if (not k_axes or out_dtype == jnp.int32) else jnp.float32

  def body(*shards):
    y = call(partial_dtype, *shards)
    return (jax.lax.psum(y, k_axes) if k_axes else y).astype(out_dtype)

  out_spec = P(entry["m"], entry["n"])
  return sharding.per_device(body, free, in_specs, out_spec, mesh=mesh)(*args)


def int8_matmul(
  x_mk: jax.Array,
  w_q: jax.Array,
  scales: jax.Array,
  *,
  out_dtype=None,
  in_axis: str | None = None,
  out_axis: str | None = None,
  **kernel_options,
):
  """x [M, K] (float32 / bfloat16) times int8 [K, N] with scales [N].

  `in_axis` / `out_axis` are the weight's logical axis names (for the per-device split under a
  mesh); `kernel_options` (implementation, interpret, block_sizes) go to the kernel API.
  """
  out_dtype = jnp.dtype(out_dtype or x_mk.dtype)

  def call(dtype, x, w, s):
    return api.int8_matmul(x, w, s, out_dtype=dtype, **kernel_options)

  layout = _layout(x_mk.shape[0], *w_q.shape, in_axis, out_axis)
  if layout is None:
    return call(out_dtype, x_mk, w_q, scales)
  dims = (("m", "k"), ("k", "n"), ("n",))
  return _per_device(call, layout, (x_mk, w_q, scales), dims, out_dtype)


def int4_matmul(
  x_mk,
  w_packed,
  scales,
  *,
  group_size: int,
  out_dtype=None,
  in_axis: str | None = None,
  out_axis: str | None = None,
  **kernel_options,
):
  """x [M, K] times packed int4 [Kp / 2, N] with group scales [Kp / group_size, N].

  K may be smaller than the padded Kp: x gets zero columns (the padded weight rows are zero), and
  then K is not split under a mesh (the padding would not line up with a split).
  """
  out_dtype = jnp.dtype(out_dtype or x_mk.dtype)
  k, (k_half, n) = x_mk.shape[-1], w_packed.shape
  pad = 2 * k_half - k
  x = jnp.pad(x_mk, [(0, 0), (0, pad)]) if pad else x_mk

  def call(dtype, x, w, s):
    return api.int4_matmul(x, w, s, group_size=group_size, out_dtype=dtype, **kernel_options)

  layout = _layout(x.shape[0], 2 * k_half, n, None if pad else in_axis, out_axis, group_size)
  if layout is None:
    return call(out_dtype, x, w_packed, scales)
  dims = (("m", "k"), ("k", "n"), ("k", "n"))
  return _per_device(call, layout, (x, w_packed, scales), dims, out_dtype)


def int8_int8_matmul(
  x_q,
  w_q,
  x_scale=None,
  w_scale=None,
  *,
  out_dtype=jnp.float32,
  in_axis: str | None = None,
  out_axis: str | None = None,
  **kernel_options,
):
  """int8 [M, K] x int8 [K, N] -> int32 [M, N] (no scales), or acc * x_scale[m] * w_scale[n].

  Accumulated exactly in int32 (`preferred_element_type=int32` in the reference; the int8 MXU /
  tensor cores in the kernels); XLA:CPU lowers it to the int8 dot units (VNNI/AMX) where present.
  Under a mesh with K split, the scaled partial products are summed in float32 (without scales,
  the int32 partial sums are summed exactly).
  """
  scaled = x_scale is not None
  out_dtype = jnp.dtype(out_dtype if scaled else jnp.int32)

  def call(dtype, x, w, *scales):
    xs, ws = scales or (None, None)
    return api.int8_int8_matmul(x, w, xs, ws, out_dtype=dtype, **kernel_options)

  layout = _layout(x_q.shape[0], *w_q.shape, in_axis, out_axis)
  if layout is None:
    return call(out_dtype, x_q, w_q, *((x_scale, w_scale) if scaled else ()))
  args, dims = (x_q, w_q), (("m", "k"), ("k", "n"))
  if scaled:
    args, dims = (*args, x_scale, w_scale), (*dims, ("m",), ("n",))
  return _per_device(call, layout, args, dims, out_dtype)

"""GPTQ (Frantar et al., 2023): second-order weight quantization with error feedback.

The layer's output error ‖XW − XŴ‖² is a quadratic in the weights with Hessian H = 2XᵀX
(X: calibration inputs [tokens, K]). GPTQ quantizes the K input rows of W [K, N] one at a time
(all N outputs at once) and, after each, moves the rows not yet quantized to cancel the error it
made, using the Cholesky factor of H⁻¹ (Optimal Brain Surgeon with a fixed order):

  H ← H + damp · mean(diag H) · I         dampening keeps H⁻¹ well conditioned
  U = chol(H⁻¹)ᵀ                          upper triangular, H⁻¹ = UᵀU
  for row i:  q_i = Q(w_i);  e = (w_i − q_i) / U[i, i];  w_j −= U[i, j] · e  for j > i

Lazy batched updates: rows are processed in blocks of `block_size`; inside a block the updates
touch only the block, and the rows after it receive the block's accumulated error in one matmul
(W[i2:] −= U[i1:i2, i2:]ᵀ E), which is what makes it fast on matrix hardware.

Scales: per output channel (8 bits) or per group of `group_size` input rows (4 bits). A group's
scale is computed from the current (error-updated) weights when quantization reaches the group's
first row, as in the reference implementation. `act_order` processes rows by decreasing diag(H)
(the most active input features first); with groups its scales are computed up front from the
original weights in the original row order ("static groups"), so the stored layout is unchanged.
Rows whose input is always zero (diag(H) = 0) quantize to 0.

Sparsity (`keep`, a mask of the weights that may be non-zero): quantization after pruning must
not undo it, yet the error feedback moves every weight not yet quantized, pruned ones included.
As in SparseGPT's joint sparsify + quantize, a pruned weight is fixed at 0 when its row comes
(q = 0 there, whatever the updates made of it) and its error w − 0 is fed back like any other,
so only kept weights end up non-zero; scales come from the kept weights alone. The `gptq` method
takes the mask from the weight itself (`keep_zeros`: its exact zeros, e.g. from an earlier
pruning stage, stay zero). A zero that was not pruned loses only the freedom to absorb feedback,
and 0 is exactly representable in every format here, so nothing else changes.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from reslm.compress.quantize import formats, rtn
from reslm.compress.registry import BOOL, integer, number, one_of, register


def hessian(x_mk: jax.Array) -> jax.Array:
  """H = 2 XᵀX / tokens, float32 [K, K] (the scale does not change GPTQ's result)."""
  x = x_mk.astype(jnp.float32)
  return 2.0 * (x.T @ x) / x.shape[0]


@functools.partial(
  jax.jit, static_argnames=("bits", "group_size", "block_size", "act_order", "scale_divisor")
)
def gptq_quantize(
  w_kn: jax.Array,
  h_kk: jax.Array,
  keep_kn: jax.Array | None = None,
  *,
  bits: int = 4,
  group_size: int = 0,
  block_size: int = 128,
  damp: float = 0.01,
  act_order: bool = False,
  scale_divisor: float | None = None,
):
  """Quantizes w [K, N] given the Hessian H [K, K] of its inputs.

  Args:
    w_kn: Weights [K, N]; with group_size > 0, K must be a multiple of it.
    h_kk: Hessian of the inputs (e.g. `hessian(x)`).
    keep_kn: Optional bool [K, N]: False marks pruned weights, quantized to exactly 0 (see the
      module docstring); None keeps every weight.
    bits: Integer bits; levels are [-2^(b-1), 2^(b-1) - 1].
    group_size: Input rows per scale, or 0 for one scale per output channel.
    block_size: Rows per lazy-update block.
    damp: Dampening, as a fraction of the mean diagonal of H.
    act_order: Quantize rows in order of decreasing diag(H).
    scale_divisor: scale = max|w| / scale_divisor; default 2^(b-1) - 1 (so RTN of the
      unchanged weights stays within [-qmax, qmax]).

  Returns:
    (q int8 [K, N] in the original row order, scales float32 ([K / group_size, N] or [N]),
    dequantized weights float32 [K, N]).
  """
  k, n = w_kn.shape
  qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  divisor = float(scale_divisor or qmax)
  gs = group_size or k
  if k % gs:
    raise ValueError(f"gptq: K={k} must be a multiple of group_size={group_size}")

  def scale_of(rows):  # [g, N] -> [N]
    amax = jnp.max(jnp.abs(rows), axis=0)
    return jnp.where(amax > 0, amax / divisor, 1.0)

  w = w_kn.astype(jnp.float32)
  h = h_kk.astype(jnp.float32)
  keep = jnp.ones((k, n), bool) if keep_kn is None else keep_kn.astype(bool)
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  w = jnp.where(dead[:, None] | ~keep, 0.0, w)

  perm = jnp.arange(k)
  static = None
  if act_order or not group_size:
    static = jnp.stack([scale_of(w[g : g + gs]) for g in range(0, k, gs)])  # [K / gs, N]
  if act_order:
    perm = jnp.argsort(-jnp.diag(h), stable=True)
    w, h, keep = w[perm], h[perm][:, perm], keep[perm]

  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=jnp.float32)
  hinv = cho_solve((jnp.linalg.cholesky(h), True), jnp.eye(k, dtype=jnp.float32))
  u = jnp.linalg.cholesky(hinv, upper=True)  # [K, K], H⁻¹ = UᵀU

  group_scales = {}
  q_rows = []
  for i1 in range(0, k, block_size):
    i2 = min(i1 + block_size, k)
    if static is not None:
      row_scale = static[perm[i1:i2] // gs]  # [rows, N]
    else:
      for g0 in range((i1 // gs) * gs, i2, gs):
        if g0 not in group_scales:  # The reference's lazy group scales: from the current w.
          kept = jnp.where(keep[g0 : g0 + gs], w[g0 : g0 + gs], 0.0)
          group_scales[g0] = scale_of(kept)
      row_scale = jnp.stack([group_scales[(r // gs) * gs] for r in range(i1, i2)])
    u1 = u[i1:i2, i1:i2]

    def body(i, carry, u1=u1, row_scale=row_scale, keep1=keep[i1:i2]):
      w1, q1, e1 = carry
      row, s = w1[i], row_scale[i]
      q = jnp.where(keep1[i], jnp.clip(jnp.round(row / s), qmin, qmax), 0.0)
      e = (row - q * s) / u1[i, i]
      # u1 is upper triangular: row i of it only moves rows j >= i of the block.
      w1 = w1 - u1[i][:, None] * e[None, :]
      return w1, q1.at[i].set(q), e1.at[i].set(e)

    zeros = jnp.zeros((i2 - i1, n), jnp.float32)
    _, q1, e1 = jax.lax.fori_loop(0, i2 - i1, body, (w[i1:i2], zeros, zeros))
    q_rows.append(q1)
    w = w.at[i2:].add(-(u[i1:i2, i2:].T @ e1))

  q = jnp.concatenate(q_rows)  # [K, N] in processing order
  q = jnp.zeros_like(q).at[perm].set(q)  # original row order
  scales = static if static is not None else jnp.stack([group_scales[g] for g in range(0, k, gs)])
  w_hat = q * jnp.repeat(scales, gs, axis=0)
  if not group_size:
    scales = scales[0]
  return q.astype(jnp.int8), scales, w_hat


@register(
  "gptq",
  stage="quantize",
  defaults={
    "bits": 4,
    "group_size": 128,
    "block_size": 128,
    "damp": 0.01,
    "act_order": False,
    "keep_zeros": True,
  },
  checks={
    "bits": one_of(4, 8),
    "group_size": one_of(*formats.GROUP_SIZES),
    "block_size": integer(1),
    "damp": number(0.0, 1.0, lo_open=True),
    "act_order": BOOL,
    "keep_zeros": BOOL,
  },
  needs_calibration=True,
)
def _gptq(w_kn, x_mk, settings):
  """GPTQ to int4 (group-wise, `group_size`) or int8 (per output channel).

  With `keep_zeros` (default), the weight's exact zeros (an earlier pruning stage's mask) are
  held at zero and the error feedback only leaves kept weights non-zero (see the module
  docstring); the report's `zeros_held` counts them.
  """
  h = hessian(x_mk)
  kw = dict(block_size=settings["block_size"], damp=settings["damp"])
  kw["act_order"] = settings["act_order"]
  keep = (w_kn != 0) if settings["keep_zeros"] else None
  info = {"zeros_held": jnp.sum(w_kn == 0)} if settings["keep_zeros"] else {}
  if settings["bits"] == 8:
    q, scales, _ = gptq_quantize(w_kn, h, keep, bits=8, group_size=0, **kw)
    r = rtn.int8_replacement(q, scales)
  else:
    g = settings["group_size"]
    k = w_kn.shape[0]
    w = formats.pad_rows(w_kn, g)
    h = jnp.pad(h, [(0, w.shape[0] - k)] * 2)  # Padded rows: dead inputs, quantized to 0.
    keep = None if keep is None else formats.pad_rows(keep, g)
    q, scales, _ = gptq_quantize(w, h, keep, bits=4, group_size=g, **kw)
    r = rtn.int4_replacement(q, scales, g)
  return dataclasses.replace(r, info=info)

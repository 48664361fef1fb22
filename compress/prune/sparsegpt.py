"""SparseGPT (Frantar & Alistarh, 2023): pruning with Optimal Brain Surgeon weight updates.

The layer's output error ‖XW − XŴ‖² has Hessian H = 2XᵀX in each output column of w [K, N]. As in
GPTQ (`compress.quantize.gptq`), the K input rows are processed in order with U = chol(H⁻¹)ᵀ
(H⁻¹ = UᵀU): row i becomes its masked self q_i, and the rows after it absorb the error
e = (w_i − q_i) / U[i, i] through w_j −= U[i, j] · e. Lazy batched updates: inside a block of
`block_size` rows the updates touch only the block; the rows after it get the block's accumulated
errors in one matmul.

Mask selection (adaptive, from the weights as updated so far):
  unstructured  at the start of each block, the round(sparsity · rows · N) entries of the block
                with the smallest OBS saliency w² / U[i, i]² are pruned (comparison group: the
                whole block, as in the reference implementation), so the total is exact when
                sparsity · rows · N is an integer for every block;
  N:M           at the start of each group of M rows, each output keeps the N of them with the
                largest saliency (block_size is rounded up to a multiple of M).
Inputs that are always zero (diag H = 0) are decoupled (diag set to 1) and pruned like any other.
"""

import functools

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from reslm.compress.prune import common
from reslm.compress.quantize.gptq import hessian
from reslm.compress.registry import Dense, integer, number, register


@functools.partial(jax.jit, static_argnames=("sparsity", "n_m", "block_size"))
def sparsegpt_prune(
  w_kn: jax.Array,
  h_kk: jax.Array,
  *,
  sparsity: float = 0.5,
  n_m: tuple[int, int] | None = None,
  block_size: int = 128,
  damp: float = 0.01,
) -> jax.Array:
  """Prunes w [K, N] given the Hessian H [K, K] of its inputs; returns the float32 result."""
  k, cols = w_kn.shape
  m = n_m[1] if n_m else 1
  bs = -(-block_size // m) * m
  pad = -k % m  # N:M: whole groups (padding rows are dead inputs with zero weights).
  w = jnp.pad(w_kn.astype(jnp.float32), ((0, pad), (0, 0)))
  h = jnp.pad(h_kk.astype(jnp.float32), ((0, pad), (0, pad)))
  kp = k + pad
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(kp, dtype=jnp.float32)
  hinv = cho_solve((jnp.linalg.cholesky(h), True), jnp.eye(kp, dtype=jnp.float32))
  u = jnp.linalg.cholesky(hinv, upper=True)  # [K, K], H⁻¹ = UᵀU

  out_rows = []
  for i1 in range(0, kp, bs):
    i2 = min(i1 + bs, kp)
    rows = i2 - i1
    u1 = u[i1:i2, i1:i2]
    d1 = jnp.diag(u1)  # [rows]
    if n_m is None:
      saliency = w[i1:i2] ** 2 / d1[:, None] ** 2
      keep0 = common.lowest_mask(saliency, common.prune_count(rows * cols, sparsity))
    else:
      keep0 = jnp.ones((rows, cols), bool)

    def body(i, carry, u1=u1, d1=d1):
      w1, keep1, e1 = carry
      if n_m is not None:  # A new group of M rows: choose its mask from the current weights.
        g = jax.lax.dynamic_slice(w1, (i, 0), (m, cols))
        dg = jax.lax.dynamic_slice(d1, (i,), (m,))
        fresh = common.n_m_mask(g**2 / dg[:, None] ** 2, *n_m)
        cur = jax.lax.dynamic_slice(keep1, (i, 0), (m, cols))
        upd = jnp.where(i % m == 0, fresh, cur)
        keep1 = jax.lax.dynamic_update_slice(keep1, upd, (i, 0))
      row = w1[i]
      q = jnp.where(keep1[i], row, 0.0)
      e = (row - q) / u1[i, i]
      # u1 is upper triangular: row i of it only moves rows j >= i of the block.
      w1 = w1 - u1[i][:, None] * e[None, :]
      w1 = w1.at[i].set(q)  # Exact zeros (the update leaves q up to rounding).
      return w1, keep1, e1.at[i].set(e)

    e0 = jnp.zeros((rows, cols), jnp.float32)
    w1, _, e1 = jax.lax.fori_loop(0, rows, body, (w[i1:i2], keep0, e0))
    out_rows.append(w1)
    w = w.at[i2:].add(-(u[i1:i2, i2:].T @ e1))
  return jnp.concatenate(out_rows)[:k]


@register(
  "sparsegpt",
  stage="prune",
  defaults={**common.SPARSITY_DEFAULTS, "block_size": 128, "damp": 0.01},
  checks={
    **common.SPARSITY_CHECKS,
    "block_size": integer(1),
    "damp": number(0.0, 1.0, lo_open=True),
  },
  needs_calibration=True,
  validate=common.validate_sparsity,
)
def _sparsegpt(w_kn, x_mk, settings):
  """SparseGPT to `sparsity` (mask per block) or N:M, with OBS updates of the remaining weights."""
  sparsity, nm = common.pattern(settings)
  w = sparsegpt_prune(
    w_kn,
    hessian(x_mk),
    sparsity=sparsity,
    n_m=nm,
    block_size=settings["block_size"],
    damp=settings["damp"],
  )
  return Dense(w)

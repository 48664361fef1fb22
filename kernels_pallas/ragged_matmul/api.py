"""The public grouped matmul: checks, a custom VJP, and the per-platform dispatch.

`implementation="auto"` stages every backend with `jax.lax.platform_dependent` (TPU kernel on
"tpu", GPU kernel on "cuda", `jax.lax.ragged_dot` in float32 anywhere else, e.g. CPU), chosen when
the program is lowered, never by querying the live device. Forward and backward are one
`jax.custom_vjp` (the kernels are never differentiated): d lhs is the forward kernel on
(d out, rhs[g]ᵀ), d rhs a per-group lhs_gᵀ · d out_g kernel.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from reslm.kernels_pallas import base
from reslm.kernels_pallas.ragged_matmul import reference, tpu
from reslm.kernels_pallas.ragged_matmul.config import (
  BlockSizes,
  RaggedConfig,
  gpu_tiles,
  make_config,
  tpu_tiles,
)

__all__ = ["BlockSizes", "ragged_matmul"]


def ragged_matmul(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  block_sizes: BlockSizes | None = None,
  implementation: str = "auto",
  interpret=False,
) -> jax.Array:
  """Grouped matmul for mixture-of-experts: out[r] = lhs[r] @ rhs[g(r)] for rows sorted by group.

  Args:
    lhs: [M, K] rows (tokens) sorted by group (expert), float32 or bfloat16.
    rhs: [G, K, N] one matrix per group, same dtype as lhs.
    group_sizes: int [G] rows per group, in order; zeros allowed. If they sum to less than M the
      remaining rows output zeros (and get zero gradients); a sum above M is clipped to M.
    block_sizes: Tile sizes (`BlockSizes`); None fields take the backend default.
    implementation: "auto" (per-platform dispatch), "tpu", "gpu" or "reference".
    interpret: Run the Pallas kernels in interpret mode (CPU tests): True, or a
      `pltpu.InterpretParams` for the TPU simulator.

  Returns:
    [M, N] in lhs's dtype (float32 accumulation), differentiable in lhs and rhs.

  Raises:
    ValueError: One line, for bad shapes, dtypes, arguments or block sizes (before lowering).
  """
  cfg = make_config(
    lhs, rhs, group_sizes, block_sizes=block_sizes, implementation=implementation,
    interpret=interpret,
  )  # fmt: skip
  if cfg.implementation in ("tpu", "auto"):
    tpu_tiles(cfg)  # Raise block-size errors here, not inside a trace.
  if cfg.implementation in ("gpu", "auto"):
    gpu_tiles(cfg)
  return _ragged(cfg, lhs, rhs, lax.stop_gradient(group_sizes.astype(jnp.int32)))


def _gpu():
  from reslm.kernels_pallas.ragged_matmul import gpu  # noqa: PLC0415 (Triton only when needed)

  return gpu


def _reference_forward(cfg: RaggedConfig, lhs, rhs, group_sizes):
  del cfg
  return reference.ragged_matmul(lhs, rhs, group_sizes)


def _reference_backward(cfg: RaggedConfig, lhs, rhs, group_sizes, d_out):
  _, vjp = jax.vjp(lambda a, b: _reference_forward(cfg, a, b, group_sizes), lhs, rhs)
  return vjp(d_out)


def _dispatch(cfg: RaggedConfig, which: str, *args):
  """Calls `which` ("forward" or "backward") of the configured backend."""
  ref = _reference_forward if which == "forward" else _reference_backward
  return base.dispatch(
    cfg.implementation,
    args,
    reference=base.bind(ref, cfg),
    tpu=base.bind(getattr(tpu, which), cfg),
    gpu=lambda: base.bind(getattr(_gpu(), which), cfg),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ragged(cfg: RaggedConfig, lhs, rhs, group_sizes):
  return _dispatch(cfg, "forward", lhs, rhs, group_sizes)


def _ragged_fwd(cfg: RaggedConfig, lhs, rhs, group_sizes):
  return _dispatch(cfg, "forward", lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _ragged_bwd(cfg: RaggedConfig, residuals, d_out):
  lhs, rhs, group_sizes = residuals
  d_lhs, d_rhs = _dispatch(cfg, "backward", lhs, rhs, group_sizes, d_out)
  return d_lhs, d_rhs, None


_ragged.defvjp(_ragged_fwd, _ragged_bwd)

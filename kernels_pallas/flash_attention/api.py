"""The public flash-attention function: checks, a custom VJP, and the per-platform dispatch.

`implementation="auto"` stages every backend with `jax.lax.platform_dependent` (TPU kernel on
"tpu"; on "cuda" the Mosaic GPU kernel for bfloat16 inputs, which needs Hopper or newer, and the
reference for float32; the jnp reference anywhere else, e.g. CPU): the choice is made when the
program is lowered for a platform, never by asking which device is live at trace time, so the same
function exports for TPU and for CUDA from a CPU host (one platform per export). Block sizes given
with "auto" must suit every kernel it may pick.

The kernels are never differentiated directly: forward and backward are one `jax.custom_vjp`
whose residuals are (q, k, v, segment ids, out, lse) in the same layout for every backend. The
residuals carry checkpoint names, so under `jax.checkpoint` the policy
`jax.checkpoint_policies.save_only_these_names(*RESIDUAL_NAMES)` keeps the forward kernel from
being recomputed in the backward pass.
"""

import functools

import jax
from jax.ad_checkpoint import checkpoint_name

from reslm.kernels_pallas import base
from reslm.kernels_pallas.flash_attention import tpu
from reslm.kernels_pallas.flash_attention.config import BlockSizes, FlashConfig, make_config
from reslm.kernels_pallas.flash_attention.reference import reference

RESIDUAL_NAMES = ("flash_attention_out", "flash_attention_lse")

__all__ = ["RESIDUAL_NAMES", "BlockSizes", "flash_attention"]


def flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  segment_ids=None,
  causal: bool = True,
  scale: float | None = None,
  block_sizes: BlockSizes | None = None,
  implementation: str = "auto",
  interpret=False,
  return_lse: bool = False,
):
  """softmax(q kᵀ · scale + mask) v with grouped-query heads, fused forward and backward.

  Args:
    q: Queries, [batch, q_len, heads, head_dim], float32 or bfloat16.
    k: Keys, [batch, kv_len, kv_heads, head_dim]; kv_heads divides heads (query head h uses kv
      head h // (heads // kv_heads)).
    v: Values, same shape and dtype as k.
    segment_ids: None, int [batch, seq] (when q_len == kv_len) or a (q_ids [batch, q_len],
      kv_ids [batch, kv_len]) pair; a query sees only keys with an equal id.
    causal: Query i sees key j only if j <= i (top-left aligned when q_len != kv_len).
    scale: Static multiplier of q kᵀ; default head_dim ** -0.5.
    block_sizes: Tile sizes (`BlockSizes`); None fields take the backend default.
    implementation: "auto" (per-platform dispatch), "tpu" (Mosaic TPU), "gpu" (Mosaic GPU,
      bfloat16 only) or "reference".
    interpret: Run the Pallas kernels in interpret mode (CPU tests): True, a
      `pltpu.InterpretParams` (TPU simulator) or a `plgpu.InterpretGPUParams` (GPU interpreter).
    return_lse: Also return the float32 log-sum-exp [batch, q_len, heads] (differentiable).

  Returns:
    out [batch, q_len, heads, head_dim] in q's dtype (zeros for a query that sees no key), or
    (out, lse) with return_lse (lse = -inf for such a query).

  Raises:
    ValueError: One line, for bad shapes, dtypes, arguments or block sizes (before lowering).
  """
  cfg, q_seg, kv_seg = make_config(
    q,
    k,
    v,
    segment_ids=segment_ids,
    causal=causal,
    scale=scale,
    block_sizes=block_sizes,
    implementation=implementation,
    interpret=interpret,
  )
  if cfg.implementation in ("tpu", "auto"):
    tpu.tpu_blocks(cfg)  # Raise block-size errors here, not deep inside a trace.
  if cfg.implementation == "gpu" or (cfg.implementation == "auto" and _gpu().supports(cfg)):
    _gpu().check(cfg)
  out, lse = _attention(cfg, q, k, v, q_seg, kv_seg)
  return (out, lse) if return_lse else out


def _gpu():
  from reslm.kernels_pallas.flash_attention import gpu  # noqa: PLC0415 (Mosaic GPU only when needed)

  return gpu


def _reference_forward(cfg: FlashConfig, q, k, v, q_seg, kv_seg):
  return reference(
    q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=cfg.causal, scale=cfg.scale
  )


def _reference_backward(cfg: FlashConfig, q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse):
  del out, lse  # Recomputed: this is the fallback, not the fast path.
  _, vjp = jax.vjp(lambda *a: _reference_forward(cfg, *a, q_seg, kv_seg), q, k, v)
  return vjp((d_out, d_lse))


def _dispatch(cfg: FlashConfig, which: str, *args):
  """Calls `which` ("forward" or "backward") of the configured backend."""
  ref = _reference_forward if which == "forward" else _reference_backward

  def gpu():
    return base.bind(getattr(_gpu(), which), cfg)

  def cuda_auto():  # The GPU kernel takes bfloat16 only; other dtypes run the reference on CUDA.
    return gpu() if _gpu().supports(cfg) else base.bind(ref, cfg)

  return base.dispatch(
    cfg.implementation,
    args,
    reference=base.bind(ref, cfg),
    tpu=base.bind(getattr(tpu, which), cfg),
    gpu=gpu,
    cuda_auto=cuda_auto,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: FlashConfig, q, k, v, q_seg, kv_seg):
  return _dispatch(cfg, "forward", q, k, v, q_seg, kv_seg)


def _attention_fwd(cfg: FlashConfig, q, k, v, q_seg, kv_seg):
  out, lse = _dispatch(cfg, "forward", q, k, v, q_seg, kv_seg)
  out, lse = checkpoint_name(out, RESIDUAL_NAMES[0]), checkpoint_name(lse, RESIDUAL_NAMES[1])
  return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _attention_bwd(cfg: FlashConfig, residuals, cotangents):
  d_out, d_lse = cotangents
  dq, dk, dv = _dispatch(cfg, "backward", *residuals, d_out, d_lse)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)

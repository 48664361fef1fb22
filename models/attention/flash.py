"""FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning") written as blocked XLA code.

Forward: for each query block, an online softmax over the key blocks keeps a running max m, sum l
and output accumulator in float32, then saves only the output and the per-row log-sum-exp
L = m + log l. Backward (`jax.custom_vjp`): D = rowsum(dO ∘ O); for each key block, loop over the
query blocks and recompute P = exp(S - L) block by block, then
  dV += Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP - D),  dQ += dS K / √d,  dK += dSᵀ Q / √d,
so no [T, S] matrix is stored in either direction. Blocks whose mask is empty for the whole batch
(above the diagonal when causal, empty KV-cache slots, disjoint segments) are skipped with
`lax.cond`. Grouped-query heads share a key block, so dK/dV sum over the query group.

Implementations (option `implementation`) of calls without a KV cache; with a cache (decoding) the
XLA code below always runs:
  "auto"    (default) the fused Pallas kernels of `kernels_pallas.flash_attention` where there are
            some, this file's blocked XLA code elsewhere, chosen per platform when the program is
            lowered (`jax.lax.platform_dependent`, never by asking which device is live): the
            Mosaic TPU kernel on TPU; on CUDA the Mosaic GPU kernel for bfloat16 (Hopper or newer)
            and the XLA code for other dtypes; the XLA code on CPU, so one config runs unchanged
            everywhere. The kernels use their per-backend default tiles (block_q/block_k size the
            XLA blocks).
  "xla"     this file's blocked XLA code on every platform.
  "pallas"  the kernels' own dispatch with block_q/block_k as their tiles: TPU and GPU kernels as
            above, elsewhere (CPU) the kernels' dense jnp reference (O(T^2) memory: a test oracle,
            not a fallback). `interpret=True` runs the TPU kernel in Pallas interpret mode instead
            (CPU tests).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.kernels_pallas.flash_attention import api as pallas_api
from reslm.kernels_pallas.flash_attention.config import BlockSizes
from reslm.models import sharding
from reslm.models.attention.base import NEG_INF, Attention, MaskInfo, attention_kwargs
from reslm.models.attention.blocks import (
  block_mask,
  check_positive,
  from_blocks,
  pad_axis,
  padded_mask_arrays,
)
from reslm.models.registry import MIXERS, mixer_options

IMPLEMENTATIONS = ("auto", "xla", "pallas")


def _slice(x: jax.Array | None, start, size: int) -> jax.Array | None:
  """x[:, start:start + size] for a traced start (None passes through)."""
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _vary_like(tree, *arrays):
  """`tree` cast to vary over the manual mesh axes the arrays vary over (inside a `shard_map`, a
  pipeline stage): loop carries started from it then have the type the loop body gives them.
  Outside a shard_map nothing varies and `tree` is returned as it is."""
  varying = frozenset().union(*(jax.typeof(a).mat.varying for a in arrays))

  def cast(x):
    missing = tuple(sorted(varying - jax.typeof(x).mat.varying))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def _scores(q_blk, k_blk, scale):
  """[b, bq, g, r, d] x [b, bk, g, d] -> scaled float32 scores [b, g, r, bq, bk]."""
  return jnp.einsum("bqgrd,bkgd->bgrqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale


def _forward(causal, bq, bk, q, k, v, q_side, kv_side):
  """Online-softmax forward on padded inputs: (out [b, tq, g, r, d], lse [b, g, r, tq])."""
  b, tq, g, r, d = q.shape
  nk = k.shape[1] // bk
  scale = d**-0.5
  (q_pos, q_seg), (kv_pos, kv_valid, kv_seg) = q_side, kv_side

  def query_block(i):
    qs = i * bq
    q_blk, qp, qsg = _slice(q, qs, bq), _slice(q_pos, qs, bq), _slice(q_seg, qs, bq)

    def key_step(j, carry):
      ks = j * bk
      mask = block_mask(
        qp, qsg, _slice(kv_pos, ks, bk), _slice(kv_valid, ks, bk), _slice(kv_seg, ks, bk), causal
      )[:, None, None]  # [b, 1, 1, bq, bk]

      def compute(carry):
        m, row_sum, acc = carry  # [b, g, r, bq] x2, [b, g, r, bq, d]
        s = jnp.where(mask, _scores(q_blk, _slice(k, ks, bk), scale), NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum(
          "bgrqk,bkgd->bgrqd",
          p.astype(v.dtype),
          _slice(v, ks, bk),
          preferred_element_type=jnp.float32,
        )
        return m_new, row_sum * correction + p.sum(-1), acc * correction[..., None] + pv

      return jax.lax.cond(mask.any(), compute, lambda c: c, carry)

    init = _vary_like(
      (
        jnp.full((b, g, r, bq), NEG_INF, jnp.float32),
        jnp.zeros((b, g, r, bq), jnp.float32),
        jnp.zeros((b, g, r, bq, d), jnp.float32),
      ),
      q_blk,
      k,
      v,
    )
    m, row_sum, acc = jax.lax.fori_loop(0, nk, key_step, init)
    safe_sum = jnp.where(row_sum > 0, row_sum, 1.0)  # 0: the row sees no key; output 0.
    out = jnp.moveaxis(acc / safe_sum[..., None], 3, 1).astype(q.dtype)  # [b, bq, g, r, d]
    return out, m + jnp.log(safe_sum)

  out, lse = jax.lax.map(
    query_block, jnp.arange(tq // bq)
  )  # [nq, b, bq, g, r, d], [nq, b, g, r, bq]
  return from_blocks(out), jnp.moveaxis(lse, 0, 3).reshape(b, g, r, tq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(causal, bq, bk, q, k, v, q_side, kv_side):
  return _forward(causal, bq, bk, q, k, v, q_side, kv_side)[0]


def _flash_fwd(causal, bq, bk, q, k, v, q_side, kv_side):
  out, lse = _forward(causal, bq, bk, q, k, v, q_side, kv_side)
  return out, (q, k, v, q_side, kv_side, out, lse)


def _flash_bwd(causal, bq, bk, res, d_out):
  q, k, v, q_side, kv_side, out, lse = res
  b, tq, g, r, d = q.shape
  scale = d**-0.5
  (q_pos, q_seg), (kv_pos, kv_valid, kv_seg) = q_side, kv_side
  # D_i = rowsum(dO ∘ O) = Σ_j P_ij dP_ij, the softmax Jacobian's correction term.
  delta = jnp.einsum("bqgrd,bqgrd->bgrq", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def key_block(dq, j):
    ks = j * bk
    k_blk, v_blk = _slice(k, ks, bk), _slice(v, ks, bk)  # [b, bk, g, d]
    kp, kvv, ksg = _slice(kv_pos, ks, bk), _slice(kv_valid, ks, bk), _slice(kv_seg, ks, bk)

    def query_step(i, carry):
      qs = i * bq
      mask = block_mask(_slice(q_pos, qs, bq), _slice(q_seg, qs, bq), kp, kvv, ksg, causal)
      mask = mask[:, None, None]  # [b, 1, 1, bq, bk]

      def compute(carry):
        dq, dk, dv = carry
        q_blk, do_blk = _slice(q, qs, bq), _slice(d_out, qs, bq)  # [b, bq, g, r, d]
        lse_blk = jax.lax.dynamic_slice_in_dim(lse, qs, bq, axis=3)  # [b, g, r, bq]
        delta_blk = jax.lax.dynamic_slice_in_dim(delta, qs, bq, axis=3)
        s = jnp.where(mask, _scores(q_blk, k_blk, scale), NEG_INF)
        p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)  # [b, g, r, bq, bk]
        f32 = dict(preferred_element_type=jnp.float32)
        dv = dv + jnp.einsum("bgrqk,bqgrd->bkgd", p.astype(do_blk.dtype), do_blk, **f32)
        dp = jnp.einsum("bqgrd,bkgd->bgrqk", do_blk, v_blk, **f32)
        ds = (p * (dp - delta_blk[..., None]) * scale).astype(q.dtype)
        dq_blk = _slice(dq, qs, bq) + jnp.einsum("bgrqk,bkgd->bqgrd", ds, k_blk, **f32)
        dk = dk + jnp.einsum("bgrqk,bqgrd->bkgd", ds, q_blk, **f32)  # Sums the query group.
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_blk, qs, axis=1), dk, dv

      return jax.lax.cond(mask.any(), compute, lambda c: c, carry)

    zeros = _vary_like(jnp.zeros((b, bk, g, d), jnp.float32), q, k, v, d_out)
    dq, dk, dv = jax.lax.fori_loop(0, tq // bq, query_step, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq0 = _vary_like(jnp.zeros(q.shape, jnp.float32), q, k, v, d_out)
  dq, (dk, dv) = jax.lax.scan(key_block, dq0, jnp.arange(k.shape[1] // bk))
  no_grad = jax.tree.map(lambda _: None, (q_side, kv_side))  # Integer mask inputs.
  return (
    dq.astype(q.dtype),
    from_blocks(dk).astype(k.dtype),
    from_blocks(dv).astype(v.dtype),
    *no_grad,
  )


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo, block_q: int, block_k: int
) -> jax.Array:
  """Exact masked attention, FlashAttention-2 style; shapes as in `reference_attention`.

  Args:
    q: Queries, [b, t, heads, d].
    k: Keys, [b, s, kv_heads, d].
    v: Values, [b, s, kv_heads, d].
    info: The mask description.
    block_q: Query block size (clipped to t).
    block_k: Key block size (clipped to s).

  Returns:
    [b, t, heads, d] in q's dtype; rows that see no key are zero.
  """
  b, t, h, d = q.shape
  s, g = k.shape[1], k.shape[2]
  bq, bk = min(block_q, t), min(block_k, s)
  q_side, kv_side = padded_mask_arrays(info, bq, bk)
  q = pad_axis(q, bq, 1).reshape(b, -1, g, h // g, d)  # [b, tq, g, r, d]
  out = _flash(info.causal, bq, bk, q, pad_axis(k, bk, 1), pad_axis(v, bk, 1), q_side, kv_side)
  return out[:, :t].reshape(b, t, h, d)


def kernel_specs(q: jax.Array, k: jax.Array):
  """How the Pallas kernels run under the active mesh and logical sharding rules.

  XLA cannot partition a Mosaic kernel, so inside a program partitioned over a mesh the kernels
  run under `jax.shard_map` with every non-manual mesh axis manual (Mosaic refuses a call with
  any automatic axis left, size-1 axes included), one call per device shard: the batch split as
  the rules split "batch", the heads as they split "heads" when "kv_heads" is split the same way
  (so every shard keeps whole query groups), the sequence whole; other mesh axes see replicas.
  Batch and head splits need no collective around the kernels.

  Returns:
    True with no mesh axis to partition over; None if the rules split the sequence (the kernels
    need it whole); else (mesh, axes made manual, (q spec, k/v spec, segment-ids spec)).
  """
  found = sharding.kernel_mesh()
  if found is None:
    return True
  mesh, free = found
  if sharding.kernel_split("seq", q.shape[1]):
    return None
  batch = sharding.kernel_split("batch", q.shape[0])
  heads = sharding.kernel_split("heads", q.shape[2], k.shape[2], taken=batch)
  if heads != sharding.kernel_split("kv_heads", q.shape[2], k.shape[2], taken=batch):
    heads = ()
  P = jax.sharding.PartitionSpec
  b, h = sharding.spec_entry(batch), sharding.spec_entry(heads)
  qkv = P(b, None, h, None)
  return mesh, free, (qkv, qkv, P(b, None))


class FlashAttention(Attention):
  """Exact softmax attention with a blocked online-softmax forward and a recomputing backward.

  Args:
    block_q: Query block size.
    block_k: Key/value block size.
    implementation: "auto" (Pallas kernels on TPU/GPU, the XLA code elsewhere), "xla" (this file)
      or "pallas" (the kernels' own dispatch; the blocks must then suit every kernel: block_q a
      multiple of 64, block_k of 128). See the module docstring.
    interpret: Only with "pallas": run the TPU kernel in interpret mode (for CPU tests; then block_q
      need only be a multiple of 8).
    **kwargs: As for `Attention`.
  """

  softmax_decode = True  # Exact softmax: an int8 KV cache is attended from its codes.

  def __init__(
    self,
    *args,
    block_q: int = 128,
    block_k: int = 128,
    implementation: str = "auto",
    interpret: bool = False,
    **kwargs,
  ):
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(
        f"implementation={implementation!r} is not known for flash "
        f"attention; choose one of: {', '.join(IMPLEMENTATIONS)}"
      )
    if not isinstance(interpret, bool):
      raise ValueError(f"interpret={interpret!r} must be true or false")
    if interpret and implementation != "pallas":
      raise ValueError(
        f"interpret=True needs implementation='pallas' for flash attention; "
        f"got implementation={implementation!r}"
      )
    self.block_q = check_positive("flash", "block_q", block_q)
    self.block_k = check_positive("flash", "block_k", block_k)
    if implementation == "pallas":
      q_multiple = 8 if interpret else 64  # TPU sublanes; GPU wgmma rows.
      for key, value, multiple in (("block_q", block_q, q_multiple), ("block_k", block_k, 128)):
        if value % multiple:
          raise ValueError(
            f"{key}={value} is not allowed with implementation='pallas'; "
            f"it must be a multiple of {multiple}"
          )
    self.implementation = implementation
    self.interpret = interpret
    super().__init__(*args, **kwargs)

  def mix(self, q, k, v, *, segment_ids_bt=None, cache=None, cache_index=None):
    if self.implementation == "xla" or cache is not None:
      return super().mix(
        q, k, v, segment_ids_bt=segment_ids_bt, cache=cache, cache_index=cache_index
      )
    specs = kernel_specs(q, k)
    if self.implementation == "pallas":
      if specs is None:
        raise ValueError(
          "flash attention with implementation='pallas' cannot split the sequence over mesh axes "
          "(the sharding rules map 'seq'); use implementation='auto' or 'xla'"
        )
      impl = "tpu" if self.interpret else "auto"
      return self._kernel(q, k, v, segment_ids_bt, impl, specs), None
    xla = lambda q, k, v: super(FlashAttention, self).mix(q, k, v, segment_ids_bt=segment_ids_bt)[0]
    # A split sequence needs the XLA code (it is partitioned automatically), and so does a
    # pipeline stage with other axes partitioned (a nested kernel call would run forward only).
    if specs is None or sharding.nested_partitioned():
      return xla(q, k, v), None
    # The Mosaic GPU kernel takes bfloat16 only (kernels_pallas.flash_attention.gpu.supports).
    on_cuda = xla
    if q.dtype == jnp.bfloat16:
      on_cuda = lambda *a: self._kernel(*a, segment_ids_bt, "gpu", specs)
    on_tpu = lambda *a: self._kernel(*a, segment_ids_bt, "tpu", specs)
    return jax.lax.platform_dependent(q, k, v, tpu=on_tpu, cuda=on_cuda, default=xla), None

  def _kernel(self, q, k, v, segment_ids, implementation: str, specs) -> jax.Array:
    """The Pallas kernels (the configured tiles with "pallas", each backend's default with
    "auto"), per device shard when the program is partitioned over a mesh."""
    blocks = None
    if self.implementation == "pallas":
      blocks = BlockSizes(block_q=self.block_q, block_kv=self.block_k)

    def attend(q, k, v, segment_ids=None):
      return pallas_api.flash_attention(
        q,
        k,
        v,
        segment_ids=segment_ids,
        causal=self.causal,
        block_sizes=blocks,
        implementation=implementation,
        interpret=self.interpret,
      )

    if specs is True:  # One device (or every mesh axis already manual): no partitioning.
      return attend(q, k, v, segment_ids)
    mesh, free, (q_spec, kv_spec, seg_spec) = specs
    args, in_specs = (q, k, v), (q_spec, kv_spec, kv_spec)
    if segment_ids is not None:
      args, in_specs = (*args, segment_ids), (*in_specs, seg_spec)
    return sharding.per_device(attend, free, in_specs, q_spec, mesh=mesh)(*args)

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo) -> jax.Array:
    return flash_attention(q, k, v, info, self.block_q, self.block_k)


@MIXERS.register("flash")
def _flash_builder(cfg, *, causal: bool, rngs: nnx.Rngs) -> FlashAttention:
  defaults = {"block_q": 128, "block_k": 128, "implementation": "auto", "interpret": False}
  options = mixer_options(cfg, "flash", defaults)
  return FlashAttention(**attention_kwargs(cfg, causal=causal, rngs=rngs), **options)

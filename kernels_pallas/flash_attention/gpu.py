"""FlashAttention-2 for NVIDIA Hopper (sm90+) as Pallas Mosaic GPU kernels (`plgpu.kernel`, wgmma).

Why Mosaic GPU: it is where Pallas on GPU is going (the Triton backend is deprecated since jax 0.11),
and on this CPU-only machine its kernels can still be checked twice: in the Mosaic GPU interpreter
(`plgpu.InterpretGPUParams`, numerics and races) and by `jax.export(..., platforms=["cuda"])`, which
runs the real Pallas -> Mosaic GPU lowering (wgmma operand rules, layouts). Not checked here: ptxas
and running on a GPU.

One warpgroup per program; inputs keep the [batch, seq, heads, head_dim] layout (TMA copies a
(tile, head_dim) box strided over heads); sequences are zero-padded to the tiles and head_dim to a
multiple of 64 (128-byte swizzled bfloat16 rows). Key/value (forward, dq) or query-side (dk/dv)
tiles are double-buffered in shared memory: the copy of tile t + 1 is in flight while tile t is
computed.

  forward, grid (batch, heads, q_tiles): online softmax over kv tiles in registers (float32 running
    max m, sum l, accumulator), out = acc / l, lse = m + log l;
  dq, grid (batch, heads, q_tiles): dQ = Σ_j dS K · scale with P = exp(S - lse), dS = P ∘ (dO Vᵀ - D);
  dk/dv, grid (batch, kv_heads, kv_tiles): loops over every query head of the group and every query
    tile, with transposed scores Sᵀ = K Qᵀ so that dV = Σ Pᵀ dO and dK = Σ dSᵀ Q · scale are plain
    wgmmas; the group sum happens in the kernel.

Causal: kv tiles above the diagonal are never fetched nor computed (the loop bounds depend on the
tile index); forward and dq run the tiles fully below the diagonal without a mask. P and dS go
through shared memory before their wgmma (the Mosaic GPU interpreter supports only shared-memory
wgmma operands and fresh accumulators; a register-operand wgmma would save that round trip on
hardware). Only bfloat16 inputs: float32 wgmma (tf32) cannot take the transposed operands used here.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from reslm.kernels_pallas.base import round_up
from reslm.kernels_pallas.flash_attention.config import (
  MASK_VALUE,
  FlashConfig,
  gpu_blocks,
)

_F32 = jnp.float32
HEAD_DIM_MULTIPLE = 64  # 128-byte rows of bfloat16 for the 128-byte swizzle.
_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def supports(cfg: FlashConfig) -> bool:
  """Whether the kernel handles this call (the "auto" dispatch falls back to the reference)."""
  return cfg.dtype == "bfloat16"


def check(cfg: FlashConfig):
  """The checked tiles; raises a one-line ValueError for inputs the kernel does not take."""
  if not supports(cfg):
    raise ValueError(
      f"flash_attention: the Mosaic GPU kernel needs bfloat16 inputs (wgmma), got {cfg.dtype}; "
      "use implementation='reference' or bfloat16"
    )
  return gpu_blocks(cfg)


def _interpret(cfg: FlashConfig):
  """None (compile for the GPU) or the Mosaic GPU interpreter's params."""
  if cfg.interpret is False or cfg.interpret is None:
    return None
  if cfg.interpret is True:
    return plgpu.InterpretGPUParams()
  if isinstance(cfg.interpret, plgpu.InterpretGPUParams):
    return cfg.interpret
  raise ValueError(
    f"flash_attention: interpret={cfg.interpret!r} is not usable by the GPU kernel; "
    "pass True or a plgpu.InterpretGPUParams"
  )


def _smem(shape):
  return plgpu.SMEM(shape, jnp.bfloat16, transforms=_TRANSFORMS)


def _mm(a_smem, b_smem, shape):
  """a @ b on the tensor cores into a fresh float32 accumulator of `shape`."""

  def run(acc):
    plgpu.wgmma(acc, a_smem, b_smem)
    return acc[...]

  return pl.run_scoped(run, plgpu.ACC(shape, _F32))


def _rows(x, shape):
  return lax.broadcast_in_dim(x, shape, [0])


def _cols(x, shape):
  return lax.broadcast_in_dim(x, shape, [1])


class _Static:
  """Plain-Python facts shared by the kernel bodies."""

  def __init__(self, cfg: FlashConfig, bq: int, bk: int, d: int):
    self.cfg, self.bq, self.bk, self.d = cfg, bq, bk, d
    self.tq, self.tk = round_up(cfg.q_len, bq), round_up(cfg.kv_len, bk)
    self.nq, self.nk = self.tq // bq, self.tk // bk
    self.kv_pad = self.tk != cfg.kv_len
    self.masked = cfg.causal or self.kv_pad or cfg.has_segments

  def mask(self, q_start, kv_start, q_seg, kv_seg, transposed: bool):
    """Visibility of a (bq, bk) tile, or (bk, bq) when transposed; segment ids are (n,) vectors."""
    shape, q_dim = ((self.bk, self.bq), 1) if transposed else ((self.bq, self.bk), 0)
    q_idx = q_start + lax.broadcasted_iota(jnp.int32, shape, q_dim)
    kv_idx = kv_start + lax.broadcasted_iota(jnp.int32, shape, 1 - q_dim)
    mask = jnp.ones(shape, jnp.bool_)
    if self.cfg.causal:
      mask = mask & (kv_idx <= q_idx)
    if self.kv_pad:
      mask = mask & (kv_idx < self.cfg.kv_len)
    if self.cfg.has_segments:
      put_q, put_kv = (_cols, _rows) if transposed else (_rows, _cols)
      mask = mask & (put_q(q_seg, shape) == put_kv(kv_seg, shape))
    return mask

  def kv_ranges(self, i):
    """(unmasked end, end) of the kv tiles a query tile i visits: [0, n_full) need no mask."""
    bq, bk = self.bq, self.bk
    n_steps = self.nk
    if self.cfg.causal:
      n_steps = jnp.minimum(self.nk, lax.div(i * bq + bq - 1, bk) + 1)
    if self.cfg.has_segments:
      return jnp.int32(0), n_steps
    n_full = n_steps
    if self.cfg.causal:
      n_full = jnp.minimum(n_full, lax.div(i * bq + 1, bk))  # Tiles wholly below the diagonal.
    if self.kv_pad:
      n_full = jnp.minimum(n_full, self.nk - 1)
    return n_full, n_steps


def _pipelined(n_full, n_steps, fetch, wait, step, carry):
  """Runs step(t, slot, masked, carry) for t in [0, n_steps) with tile t + 1 prefetched."""

  @pl.when(n_steps > 0)
  def _():
    fetch(0, 0)

  def body(masked):
    def run(t, carry):
      slot = lax.rem(t, 2)

      @pl.when(t + 1 < n_steps)
      def _():
        fetch(t + 1, 1 - slot)

      wait(slot)
      return step(t, slot, masked, carry)

    return run

  carry = lax.fori_loop(0, n_full, body(False), carry)
  return lax.fori_loop(n_full, n_steps, body(True), carry)


def _copy(src, dst, barrier):
  plgpu.copy_gmem_to_smem(src, dst, barrier)


def _q_side_kernel(*refs, st: _Static, backward: bool, **smem):
  """Forward (backward=False) or dq (backward=True) program for one (batch, head, q tile)."""
  cfg, bq, bk, d = st.cfg, st.bq, st.bk, st.d
  n_in = 6 if backward else 3
  ins, rest = refs[:n_in], refs[n_in:]
  if cfg.has_segments:
    (q_seg_ref, kv_seg_ref), rest = rest[:2], rest[2:]
  q_ref, k_ref, v_ref = ins[:3]
  q_s, k_s, v_s, p_s, rows_s = (smem[n] for n in ("q", "k", "v", "p", "rows"))
  q_bar, kv_bar = smem["q_bar"], smem["kv_bar"]
  b, h, i = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tiles")
  hk = lax.div(h, cfg.group)
  q_rows = pl.ds(i * bq, bq)

  # The query-side tiles, once per program, each on its own barrier.
  loads = [(q_ref.at[b, q_rows, h], q_s)]
  if backward:
    do_ref, lse_ref, di_ref = ins[3:]
    loads += [
      (do_ref.at[b, q_rows, h], smem["do"]),
      (lse_ref.at[b, h, q_rows], rows_s.at[0]),
      (di_ref.at[b, h, q_rows], rows_s.at[1]),
    ]
  if cfg.has_segments:
    loads.append((q_seg_ref.at[b, q_rows], smem["q_seg"]))
  for n, (src, dst) in enumerate(loads):
    _copy(src, dst, q_bar.at[n])

  def fetch(j, slot):
    kv_rows = pl.ds(j * bk, bk)
    _copy(k_ref.at[b, kv_rows, hk], k_s.at[slot], kv_bar.at[0, slot])
    _copy(v_ref.at[b, kv_rows, hk], v_s.at[slot], kv_bar.at[1, slot])
    if cfg.has_segments:
      _copy(kv_seg_ref.at[b, kv_rows], smem["kv_seg"].at[slot], kv_bar.at[2, slot])

  def wait(slot):
    for n in range(3 if cfg.has_segments else 2):
      plgpu.barrier_wait(kv_bar.at[n, slot])

  n_full, n_steps = st.kv_ranges(i)
  for n in range(len(loads)):
    plgpu.barrier_wait(q_bar.at[n])
  q_seg = smem["q_seg"][...] if cfg.has_segments else None
  shape = (bq, bk)

  def scores(j, slot, masked):
    s = _mm(q_s, k_s.at[slot].T, shape) * cfg.scale
    if masked:
      kv_seg = smem["kv_seg"][slot] if cfg.has_segments else None
      s = jnp.where(st.mask(i * bq, j * bk, q_seg, kv_seg, False), s, MASK_VALUE)
    return s

  if backward:
    (dq_ref,) = rest
    lse, di = rows_s[0], rows_s[1]

    def step(j, slot, masked, dq):
      p = jnp.exp(scores(j, slot, masked) - _rows(lse, shape))
      dp = _mm(smem["do"], v_s.at[slot].T, shape)
      p_s[...] = (p * (dp - _rows(di, shape))).astype(p_s.dtype)  # dS
      plgpu.commit_smem()
      return dq + _mm(p_s, k_s.at[slot], (bq, d))

    dq = _pipelined(n_full, n_steps, fetch, wait, step, jnp.zeros((bq, d), _F32))
    q_s[...] = (dq * cfg.scale).astype(q_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_s, dq_ref.at[b, q_rows, h])
    plgpu.wait_smem_to_gmem(0)
    return

  o_ref, lse_out_ref = rest

  def step(j, slot, masked, carry):
    acc, m, total = carry
    s = scores(j, slot, masked)
    m_next = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp(s - _rows(m_next, shape))
    alpha = jnp.exp(m - m_next)
    p_s[...] = p.astype(p_s.dtype)
    plgpu.commit_smem()
    acc = acc * _rows(alpha, (bq, d)) + _mm(p_s, v_s.at[slot], (bq, d))
    return acc, m_next, total * alpha + p.sum(axis=1)

  init = (jnp.zeros((bq, d), _F32), jnp.full((bq,), MASK_VALUE, _F32), jnp.zeros((bq,), _F32))
  acc, m, total = _pipelined(n_full, n_steps, fetch, wait, step, init)
  empty = m == MASK_VALUE  # The row saw no key.
  out = acc / _rows(total, (bq, d))
  q_s[...] = jnp.where(_rows(empty, (bq, d)), 0.0, out).astype(q_s.dtype)
  rows_s[0] = jnp.where(empty, -jnp.inf, m + jnp.log(total))
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_s, o_ref.at[b, q_rows, h])
  plgpu.copy_smem_to_gmem(rows_s.at[0], lse_out_ref.at[b, h, q_rows])
  plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(*refs, st: _Static, **smem):
  """dk/dv program for one (batch, kv head, kv tile), summing every query head of the group."""
  cfg, bq, bk, d = st.cfg, st.bq, st.bk, st.d
  (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), rest = refs[:6], refs[6:]
  if cfg.has_segments:
    (q_seg_ref, kv_seg_ref), rest = rest[:2], rest[2:]
  dk_ref, dv_ref = rest
  k_s, v_s, q_s, do_s, rows_s = (smem[n] for n in ("k", "v", "q", "do", "rows"))
  kv_bar, q_bar = smem["kv_bar"], smem["q_bar"]
  b, hk, j = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("kv_tiles")
  kv_rows = pl.ds(j * bk, bk)
  _copy(k_ref.at[b, kv_rows, hk], k_s, kv_bar.at[0])
  _copy(v_ref.at[b, kv_rows, hk], v_s, kv_bar.at[1])
  if cfg.has_segments:
    _copy(kv_seg_ref.at[b, kv_rows], smem["kv_seg"], kv_bar.at[2])
  # Causal: query tiles before i0 end above this kv tile, so they are never fetched.
  i0 = jnp.minimum(lax.div(j * bk, bq), st.nq) if cfg.causal else jnp.int32(0)
  per_head = st.nq - i0
  n_steps = per_head * cfg.group

  def tile(t):
    """(query head, query tile) of step t."""
    safe = jnp.maximum(per_head, 1)
    return hk * cfg.group + lax.div(t, safe), i0 + lax.rem(t, safe)

  def fetch(t, slot):
    h, i = tile(t)
    q_rows = pl.ds(i * bq, bq)
    _copy(q_ref.at[b, q_rows, h], q_s.at[slot], q_bar.at[0, slot])
    _copy(do_ref.at[b, q_rows, h], do_s.at[slot], q_bar.at[1, slot])
    _copy(lse_ref.at[b, h, q_rows], rows_s.at[slot, 0], q_bar.at[2, slot])
    _copy(di_ref.at[b, h, q_rows], rows_s.at[slot, 1], q_bar.at[3, slot])
    if cfg.has_segments:
      _copy(q_seg_ref.at[b, q_rows], smem["q_seg"].at[slot], q_bar.at[4, slot])

  def wait(slot):
    for n in range(5 if cfg.has_segments else 4):
      plgpu.barrier_wait(q_bar.at[n, slot])

  for n in range(3 if cfg.has_segments else 2):
    plgpu.barrier_wait(kv_bar.at[n])
  kv_seg = smem["kv_seg"][...] if cfg.has_segments else None
  shape = (bk, bq)

  def step(t, slot, masked, carry):
    dk, dv = carry
    _, i = tile(t)
    s_t = _mm(k_s, q_s.at[slot].T, shape) * cfg.scale  # Sᵀ
    if masked:
      q_seg = smem["q_seg"][slot] if cfg.has_segments else None
      s_t = jnp.where(st.mask(i * bq, j * bk, q_seg, kv_seg, True), s_t, MASK_VALUE)
    p_t = jnp.exp(s_t - _cols(rows_s[slot, 0], shape))
    smem["p_t"][...] = p_t.astype(jnp.bfloat16)
    dp_t = _mm(v_s, do_s.at[slot].T, shape)
    smem["ds_t"][...] = (p_t * (dp_t - _cols(rows_s[slot, 1], shape))).astype(jnp.bfloat16)
    plgpu.commit_smem()
    dv = dv + _mm(smem["p_t"], do_s.at[slot], (bk, d))
    dk = dk + _mm(smem["ds_t"], q_s.at[slot], (bk, d))
    return dk, dv

  zeros = jnp.zeros((bk, d), _F32)
  first_masked = jnp.int32(0) if st.masked else n_steps
  dk, dv = _pipelined(first_masked, n_steps, fetch, wait, step, (zeros, zeros))
  k_s[...] = (dk * cfg.scale).astype(k_s.dtype)
  v_s[...] = dv.astype(v_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_s, dk_ref.at[b, kv_rows, hk])
  plgpu.copy_smem_to_gmem(v_s, dv_ref.at[b, kv_rows, hk])
  plgpu.wait_smem_to_gmem(0)


# ------------------------------------------------------------------------------- layout and calls


def _pad(x, length: int, width: int | None = None):
  """Zero-pads axis 1 of x to `length` (and the last axis to `width`)."""
  pads = [(0, 0)] * x.ndim
  pads[1] = (0, length - x.shape[1])
  if width is not None:
    pads[-1] = (0, width - x.shape[-1])
  return jnp.pad(x, pads) if any(p[1] for p in pads) else x


def _per_query(x, length: int):
  """A float per (query, head), [b, t, heads] -> float32 [b, heads, length], zero-padded."""
  x = jnp.swapaxes(x, 1, 2).astype(_F32)
  return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2])))


def _cost(st: _Static, matmuls: int, nbytes: int) -> pl.CostEstimate:
  cfg = st.cfg
  pairs = st.nq * st.nk
  if cfg.causal:
    pairs = sum(min(st.nk, (i * st.bq + st.bq - 1) // st.bk + 1) for i in range(st.nq))
  scores = cfg.batch * cfg.num_heads * pairs * st.bq * st.bk
  return pl.CostEstimate(
    flops=int(2 * matmuls * scores * st.d), transcendentals=int(scores), bytes_accessed=int(nbytes)
  )


def _nbytes(*arrays) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in arrays)


def _segments(st: _Static, q_seg, kv_seg):
  if not st.cfg.has_segments:
    return []
  return [_pad(q_seg, st.tq), _pad(kv_seg, st.tk)]


def forward(cfg: FlashConfig, q, k, v, q_seg, kv_seg):
  """Forward kernel: (out [b, tq, heads, d] bfloat16, lse float32 [b, tq, heads])."""
  blocks = check(cfg)
  d = round_up(cfg.head_dim, HEAD_DIM_MULTIPLE)
  st = _Static(cfg, blocks.block_q, blocks.block_kv, d)
  bq, bk = st.bq, st.bk
  q_p = _pad(q, st.tq, d)
  k_p, v_p = _pad(k, st.tk, d), _pad(v, st.tk, d)
  scratch = dict(
    q=_smem((bq, d)),  # q, then the output tile.
    k=_smem((2, bk, d)),
    v=_smem((2, bk, d)),
    p=_smem((bq, bk)),
    rows=plgpu.SMEM((1, bq), _F32),  # lse
    q_bar=plgpu.Barrier(num_barriers=2),
    kv_bar=plgpu.Barrier(num_barriers=(3, 2)),
  )
  if cfg.has_segments:
    scratch.update(q_seg=plgpu.SMEM((bq,), jnp.int32), kv_seg=plgpu.SMEM((2, bk), jnp.int32))
  out, lse = plgpu.kernel(
    functools.partial(_q_side_kernel, st=st, backward=False),
    out_type=[
      jax.ShapeDtypeStruct(q_p.shape, q.dtype),
      jax.ShapeDtypeStruct((cfg.batch, cfg.num_heads, st.tq), _F32),
    ],
    scratch_types=scratch,
    grid=(cfg.batch, cfg.num_heads, st.nq),
    grid_names=("batch", "heads", "q_tiles"),
    cost_estimate=_cost(st, 2, 2 * _nbytes(q_p) + st.nq * _nbytes(k_p, v_p)),
    interpret=_interpret(cfg),
  )(q_p, k_p, v_p, *_segments(st, q_seg, kv_seg))
  lse = jnp.swapaxes(lse[:, :, : cfg.q_len], 1, 2)
  return out[:, : cfg.q_len, :, : cfg.head_dim], lse


def backward(cfg: FlashConfig, q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse):
  """The dq and dk/dv kernels: gradients w.r.t. q, k, v for cotangents (d_out, d_lse)."""
  blocks = check(cfg)
  d = round_up(cfg.head_dim, HEAD_DIM_MULTIPLE)
  st = _Static(cfg, blocks.block_q_bwd, blocks.block_kv_bwd, d)
  bq, bk = st.bq, st.bk
  q_p, do_p = _pad(q, st.tq, d), _pad(d_out, st.tq, d)
  k_p, v_p = _pad(k, st.tk, d), _pad(v, st.tk, d)
  delta = jnp.einsum("bthd,bthd->bth", d_out.astype(_F32), out.astype(_F32)) - d_lse
  lse_p = _per_query(jnp.where(lse == -jnp.inf, jnp.inf, lse), st.tq)  # Empty rows: P = 0.
  di_p = _per_query(delta, st.tq)
  segs = _segments(st, q_seg, kv_seg)
  interpret = _interpret(cfg)

  def seg_smem(q_shape, kv_shape):
    if not cfg.has_segments:
      return {}
    return dict(q_seg=plgpu.SMEM(q_shape, jnp.int32), kv_seg=plgpu.SMEM(kv_shape, jnp.int32))

  q_tiles = dict(grid=(cfg.batch, cfg.num_heads, st.nq), grid_names=("batch", "heads", "q_tiles"))
  dq = plgpu.kernel(
    functools.partial(_q_side_kernel, st=st, backward=True),
    out_type=jax.ShapeDtypeStruct(q_p.shape, q.dtype),
    scratch_types=dict(
      q=_smem((bq, d)),  # q, then the dq tile.
      do=_smem((bq, d)),
      k=_smem((2, bk, d)),
      v=_smem((2, bk, d)),
      p=_smem((bq, bk)),  # dS
      rows=plgpu.SMEM((2, bq), _F32),  # lse, D
      q_bar=plgpu.Barrier(num_barriers=5),
      kv_bar=plgpu.Barrier(num_barriers=(3, 2)),
      **seg_smem((bq,), (2, bk)),
    ),
    cost_estimate=_cost(st, 3, 3 * _nbytes(q_p) + st.nq * _nbytes(k_p, v_p)),
    interpret=interpret,
    **q_tiles,
  )(q_p, k_p, v_p, do_p, lse_p, di_p, *segs)
  dk, dv = plgpu.kernel(
    functools.partial(_dkv_kernel, st=st),
    out_type=[jax.ShapeDtypeStruct(k_p.shape, k.dtype)] * 2,
    scratch_types=dict(
      k=_smem((bk, d)),  # k, then the dk tile.
      v=_smem((bk, d)),  # v, then the dv tile.
      q=_smem((2, bq, d)),
      do=_smem((2, bq, d)),
      p_t=_smem((bk, bq)),
      ds_t=_smem((bk, bq)),
      rows=plgpu.SMEM((2, 2, bq), _F32),  # lse, D per slot.
      kv_bar=plgpu.Barrier(num_barriers=3),
      q_bar=plgpu.Barrier(num_barriers=(5, 2)),
      **seg_smem((2, bq), (bk,)),
    ),
    grid=(cfg.batch, cfg.num_kv_heads, st.nk),
    grid_names=("batch", "kv_heads", "kv_tiles"),
    cost_estimate=_cost(st, 4, 2 * _nbytes(k_p, v_p) + st.nk * _nbytes(q_p, do_p)),
    interpret=interpret,
  )(q_p, k_p, v_p, do_p, lse_p, di_p, *segs)
  h = cfg.head_dim
  return dq[:, : cfg.q_len, :, :h], dk[:, : cfg.kv_len, :, :h], dv[:, : cfg.kv_len, :, :h]

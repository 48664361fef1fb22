"""The public function's contract: the reference's own definition, one-line errors for bad inputs
before anything is lowered, and block-size clipping."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from reslm.kernels_pallas.flash_attention import BlockSizes, flash_attention, reference
from reslm.kernels_pallas.flash_attention.config import make_config, tpu_blocks

B, T, H, HK, D = 2, 24, 4, 2, 16


def qkv(dtype=jnp.float32, t=T, s=T, h=H, hk=HK, d=D):
  rng = np.random.default_rng(0)
  shapes = ((B, t, h, d), (B, s, hk, d), (B, s, hk, d))
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes)


def test_reference_is_grouped_masked_softmax():
  """Against a per-head loop over explicit softmax weights; empty rows give zeros and lse -inf."""
  q, k, v = qkv()
  seg = jnp.asarray(np.repeat([[1, 2, 3]], B, 0).repeat(T // 3, 1), jnp.int32)
  kv_seg = jnp.where(seg == 3, 4, seg)  # Segment 3 has no keys.
  attend = jax.jit(functools.partial(reference, causal=True, scale=0.3))
  out, lse = attend(q, k, v, q_segment_ids=seg, kv_segment_ids=kv_seg)
  q, k, v, seg, kv_seg = (np.asarray(x, np.float64) for x in (q, k, v, seg, kv_seg))
  i = np.arange(T)
  for b in range(B):
    for h in range(H):
      s = q[b, :, h] @ k[b, :, h // (H // HK)].T * 0.3
      mask = (i[None, :] <= i[:, None]) & (seg[b][:, None] == kv_seg[b][None])
      s = np.where(mask, s, -np.inf)
      seen = mask.any(1)
      with np.errstate(invalid="ignore", divide="ignore"):  # Rows with no visible key.
        w = np.exp(s - s.max(1, keepdims=True, where=mask, initial=-1e30))
        w = np.where(seen[:, None], w / w.sum(1, keepdims=True), 0)
        want_lse = np.where(seen, np.log(np.exp(s).sum(1, where=mask)), -np.inf)
      np.testing.assert_allclose(out[b, :, h], w @ v[b, :, h // (H // HK)], atol=1e-5, rtol=1e-5)
      np.testing.assert_allclose(lse[b, :, h], want_lse, atol=1e-5, rtol=1e-5)
  assert np.isneginf(np.asarray(lse[:, 2 * T // 3 :])).all()


def test_auto_on_cpu_equals_the_reference():
  q, k, v = qkv()
  got = jax.jit(lambda *a: flash_attention(*a, causal=False, implementation="auto"))(q, k, v)
  want, _ = jax.jit(lambda *a: reference(*a, causal=False))(q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_tpu_blocks_shrink_to_short_sequences():
  q, k, v = qkv(jnp.bfloat16, t=20, s=300)
  cfg, _, _ = make_config(
    q, k, v, segment_ids=None, causal=True, scale=None, block_sizes=None,
    implementation="tpu", interpret=False,
  )  # fmt: skip
  blocks = tpu_blocks(cfg)
  assert (blocks.block_q, blocks.block_kv) == (32, 384)  # bfloat16 rows padded to 16s, kv to 128s.
  assert blocks.heads_per_block == H // HK


BF16 = qkv(jnp.bfloat16)


def _call(**overrides):
  args = dict(zip("qkv", qkv(), strict=True))
  args.update({k: overrides.pop(k) for k in list(overrides) if k in "qkv"})
  return flash_attention(args["q"], args["k"], args["v"], **overrides)


@pytest.mark.parametrize(
  ("overrides", "match"),
  [
    (dict(q=jnp.zeros((B, T, H))), "q must be"),
    (dict(q=jnp.zeros((B, T, H, D), jnp.float16)), "dtype float16"),
    (dict(k=jnp.zeros((B, T, HK, D), jnp.bfloat16)), "share one dtype"),
    (dict(v=jnp.zeros((B, T + 1, HK, D))), "same shape"),
    (dict(k=jnp.zeros((B, T, HK, D + 1)), v=jnp.zeros((B, T, HK, D + 1))), "head_dim"),
    (dict(k=jnp.zeros((B, T, 3, D)), v=jnp.zeros((B, T, 3, D))), "must divide"),
    (dict(k=jnp.zeros((B, 0, HK, D)), v=jnp.zeros((B, 0, HK, D))), "positive"),
    (dict(segment_ids=jnp.zeros((B, T + 1), jnp.int32)), "segment_ids has shape"),
    (dict(segment_ids=jnp.zeros((B, T), jnp.float32)), "integer dtype"),
    (dict(segment_ids=(jnp.zeros((B, T), jnp.int32),)), "pair"),
    (dict(causal=1), "causal=1"),
    (dict(scale=jnp.float32(0.5)), "scale="),
    (dict(implementation="triton"), "implementation='triton'"),
    (dict(block_sizes=(128, 128)), "BlockSizes"),
    (dict(implementation="tpu", block_sizes=BlockSizes(block_kv=64)), "block_kv=64"),
    (dict(implementation="tpu", block_sizes=BlockSizes(block_q_bwd=12)), "block_q_bwd=12"),
    (dict(implementation="tpu", block_sizes=BlockSizes(heads_per_block=3)), "heads_per_block=3"),
    (dict(zip("qkv", BF16, strict=True), implementation="gpu", block_sizes=BlockSizes(96)), "=96"),
    (dict(implementation="gpu"), "bfloat16"),
    (dict(implementation="auto", block_sizes=BlockSizes(block_kv=64)), "TPU"),
    (dict(implementation="tpu", interpret=plgpu.InterpretGPUParams()), "interpret="),
  ],
)
def test_bad_arguments_raise_one_line_errors(overrides, match):
  with pytest.raises(ValueError, match=match) as err:
    _call(**overrides)
  assert "\n" not in str(err.value) and str(err.value).startswith("flash_attention: ")


def test_block_sizes_must_be_positive_ints():
  with pytest.raises(ValueError, match=r"block_sizes.block_q=0"):
    BlockSizes(block_q=0)


def test_segment_ids_need_a_pair_for_cross_lengths():
  q, k, v = qkv(s=T + 8)
  with pytest.raises(ValueError, match="pair"):
    flash_attention(q, k, v, segment_ids=jnp.zeros((B, T), jnp.int32))

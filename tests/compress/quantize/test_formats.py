"""Number formats against their definitions: RTN error bounds, int4 packing, NF4 levels and double
quantization, and that packed storage really takes the bytes it should."""

import jax.numpy as jnp
import numpy as np
import pytest

from reslm.compress.quantize import formats
from reslm.compress.quantize.layers import Int4Linear, NF4Linear

# QLoRA's NF4 levels as published (Dettmers et al. 2023, appendix; bitsandbytes' table).
PUBLISHED_NF4 = [
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
  0.7229568362236023, 1.0,
]  # fmt: skip
F32_EPS = 1e-6


def weights(k, n, seed=0):
  w = np.random.default_rng(seed).standard_t(df=4, size=(k, n)).astype(np.float32)
  w[:, 0] = 0.0  # An all-zero output channel must not divide by zero.
  return jnp.asarray(w)


def test_int8_error_within_half_a_step_per_channel():
  w = weights(70, 9)
  q, scales = formats.quantize_int8(w)
  assert q.dtype == jnp.int8 and scales.shape == (9,)
  np.testing.assert_allclose(scales[1:], jnp.max(jnp.abs(w[:, 1:]), axis=0) / 127, rtol=1e-6)
  err = jnp.abs(q * scales - w)
  assert bool(jnp.all(err <= scales / 2 * (1 + F32_EPS)))
  assert int(jnp.max(jnp.abs(q))) == 127  # The largest weight of a channel maps to ±127.


def test_int4_group_error_bound_with_padding():
  k, g = 70, 32  # K not a multiple of the group: padded to 96 with zero rows.
  w = weights(k, 6, seed=1)
  q, scales = formats.quantize_int4(w, g)
  assert q.shape == (96, 6) and scales.shape == (3, 6)
  assert int(jnp.max(jnp.abs(q))) <= 7 and bool(jnp.all(q[k:] == 0))
  step = jnp.repeat(scales, g, axis=0)[:k]
  deq = formats.dequantize_int4(formats.pack_int4(q), scales, g, k)
  assert deq.shape == (k, 6)
  assert bool(jnp.all(jnp.abs(deq - w) <= step / 2 * (1 + F32_EPS)))


def test_int4_packing_round_trips_and_layout():
  rng = np.random.default_rng(2)
  q = rng.integers(-8, 8, size=(10, 5))
  packed = formats.pack_int4(jnp.asarray(q))
  assert packed.shape == (5, 5) and packed.dtype == jnp.int8
  np.testing.assert_array_equal(formats.unpack_int4(packed), q)
  # Byte layout: low nibble = even K row, high nibble = odd K row (two's complement).
  byte = np.asarray(packed).astype(np.uint8)
  np.testing.assert_array_equal(byte & 0xF, q[0::2] & 0xF)
  np.testing.assert_array_equal(byte >> 4, q[1::2] & 0xF)
  codes = rng.integers(0, 16, size=(8, 3))
  np.testing.assert_array_equal(
    formats.unpack_int4(formats.pack_int4(jnp.asarray(codes)), signed=False), codes
  )
  with pytest.raises(ValueError, match="even"):
    formats.pack_int4(jnp.zeros((3, 2), jnp.int8))


def test_nf4_levels_are_the_published_ones():
  code = formats.nf4_code()
  np.testing.assert_allclose(code, PUBLISHED_NF4, atol=1e-6)
  assert len(set(code.tolist())) == 16 and 0.0 in code.tolist()


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_rounds_to_the_nearest_level(double_quant):
  k, n, block = 100, 7, 32
  w = weights(k, n, seed=3)
  arrays = formats.quantize_nf4(w, block, double_quant=double_quant, dq_block=8)
  deq = formats.dequantize_nf4(arrays, block, k, dq_block=8)
  wp = formats.pad_rows(w, block)
  absmax_exact = jnp.max(jnp.abs(wp.reshape(-1, block, n)), axis=1)
  if double_quant:
    assert set(arrays) == {"codes", "absmax_q", "absmax_scale", "absmax_mean"}
    absmax = formats.dequantize_absmax(arrays, absmax_exact.shape, 8)
    # Double quantization: int8 of (absmax - mean) per block of 8 constants, half a step each.
    step = jnp.repeat(arrays["absmax_scale"], 8)[: absmax.size].reshape(absmax.shape)
    assert bool(jnp.all(jnp.abs(absmax - absmax_exact) <= step / 2 * (1 + F32_EPS) + 1e-7))
  else:
    absmax = arrays["absmax"]
    np.testing.assert_allclose(absmax, absmax_exact, rtol=1e-6)
  # Each weight maps to the level nearest to w / absmax of its block.
  a = jnp.repeat(absmax, block, axis=0)[:k]
  normed = w / jnp.where(a > 0, a, 1.0)
  code = jnp.asarray(formats.nf4_code())
  best = jnp.min(jnp.abs(normed[..., None] - code), axis=-1) * a
  np.testing.assert_allclose(jnp.abs(deq - w), best, atol=1e-5)


def test_packed_storage_really_shrinks():
  k, n = 128, 64
  w = weights(k, n, seed=4)
  q, s = formats.quantize_int4(w, 64)
  int4 = Int4Linear({"w_packed": formats.pack_int4(q), "scales": s}, in_shape=(k,), out_shape=(n,))
  stored = sum(v.nbytes for v in int4.layer_arrays().values())
  assert stored == k * n // 2 + (k // 64) * n * 4  # 4 bits per weight + a float32 per group
  nf4 = NF4Linear(formats.quantize_nf4(w, 64), in_shape=(k,), out_shape=(n,))
  nf4_bytes = sum(v.nbytes for v in nf4.layer_arrays().values())
  assert nf4_bytes < k * n * 0.52  # ≈ 4.13 bits per weight with double quantization
  assert w.nbytes / stored > 7

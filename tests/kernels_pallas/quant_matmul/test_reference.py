"""Rung 0: the packing, the quantizers and the references against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reslm.kernels_pallas.quant_matmul import (
  pack_int4,
  quantize_int4,
  quantize_int8,
  quantize_rows_int8,
  unpack_int4,
)
from reslm.kernels_pallas.quant_matmul import reference as ref


def test_int4_pack_unpack_round_trip_and_layout():
  """Every int4 value survives; byte r holds row 2r in the low nibble and 2r + 1 in the high."""
  rng = np.random.default_rng(0)
  w = rng.integers(-8, 8, size=(64, 24), dtype=np.int8)
  w[:16, 0] = np.arange(-8, 8)  # Every value at least once.
  packed = pack_int4(jnp.asarray(w))
  assert packed.dtype == jnp.int8 and packed.shape == (32, 24)
  np.testing.assert_array_equal(np.asarray(unpack_int4(packed)), w)
  byte = np.asarray(packed).view(np.uint8).astype(np.int32)
  np.testing.assert_array_equal(byte & 0xF, w[0::2].astype(np.int32) & 0xF)
  np.testing.assert_array_equal(byte >> 4, w[1::2].astype(np.int32) & 0xF)


def test_pack_int4_rejects_odd_k():
  with pytest.raises(ValueError, match="even"):
    pack_int4(jnp.zeros((3, 4), jnp.int8))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_int4_error_bound(group):
  """|w - dequant(quant(w))| <= scale / 2 per group, scale = max |w| of the group / 7."""
  w = jax.random.normal(jax.random.key(group), (256, 48), jnp.float32)
  packed, scales = quantize_int4(w, group)
  assert scales.shape == (256 // group, 48)
  err = np.abs(np.asarray(ref.dequantize_int4(packed, scales, group) - w))
  bound = np.repeat(np.asarray(scales), group, axis=0) / 2 + 1e-7
  assert (err <= bound).all()
  q = np.asarray(unpack_int4(packed))
  assert q.min() >= -8 and q.max() <= 7 and (np.abs(q).reshape(-1, group, 48).max(1) == 7).all()


def test_quantize_int8_per_channel_and_rows():
  w = jax.random.normal(jax.random.key(1), (96, 40), jnp.float32)
  w_q, scales = quantize_int8(w)
  assert w_q.dtype == jnp.int8 and scales.shape == (40,)
  err = np.abs(np.asarray(ref.dequantize_int8(w_q, scales) - w))
  assert (err <= np.asarray(scales)[None] / 2 + 1e-7).all()
  x_q, x_scale = quantize_rows_int8(w)
  assert x_scale.shape == (96,)
  assert (
    np.abs(np.asarray(x_q, np.float32) * np.asarray(x_scale)[:, None] - np.asarray(w))
    <= np.asarray(x_scale)[:, None] / 2 + 1e-7
  ).all()


def test_references_equal_their_definitions():
  """int4 = Σ_g (x_g @ w_g) s_g per group in float64; int8 = (x @ w) s; W8A8 exact in int32."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal((5, 3, 128)).astype(np.float32)
  w = rng.standard_normal((128, 24)).astype(np.float32)
  packed, s4 = quantize_int4(jnp.asarray(w), 32)
  q4 = np.asarray(unpack_int4(packed), np.float64)
  want = sum(
    (x.astype(np.float64)[..., g * 32 : (g + 1) * 32] @ q4[g * 32 : (g + 1) * 32])
    * np.asarray(s4, np.float64)[g]
    for g in range(4)
  )
  got = ref.int4_matmul(jnp.asarray(x), packed, s4, group_size=32)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

  w_q, s8 = quantize_int8(jnp.asarray(w))
  want = (x.astype(np.float64) @ np.asarray(w_q, np.float64)) * np.asarray(s8, np.float64)
  np.testing.assert_allclose(
    np.asarray(ref.int8_matmul(jnp.asarray(x), w_q, s8)), want, rtol=1e-5, atol=1e-5
  )

  x_q = rng.integers(-128, 128, size=(7, 128), dtype=np.int8)
  acc = ref.int8_int8_matmul(jnp.asarray(x_q), w_q)
  assert acc.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(acc), x_q.astype(np.int64) @ np.asarray(w_q, np.int64))
  xs, ws = np.linspace(0.5, 2, 7, dtype=np.float32), np.asarray(s8)
  got = ref.int8_int8_matmul(jnp.asarray(x_q), w_q, jnp.asarray(xs), s8)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(acc, np.float64) * xs[:, None] * ws, rtol=1e-6
  )


def test_quantized_matmul_tracks_the_float_matmul():
  """End to end: the int4 / int8 products stay within the quantization error of x @ w."""
  x = jax.random.normal(jax.random.key(3), (16, 256), jnp.float32)
  w = jax.random.normal(jax.random.key(4), (256, 64), jnp.float32)
  exact = np.asarray(x @ w)
  packed, s4 = quantize_int4(w, 64)
  w_q, s8 = quantize_int8(w)
  # Each weight error is <= s/2 (uniform-ish), so the product error ~ |x| s/2 sqrt(K / 3).
  for got, s in (
    (ref.int4_matmul(x, packed, s4, group_size=64), s4),
    (ref.int8_matmul(x, w_q, s8), s8),
  ):
    bound = 4 * float(jnp.max(s)) / 2 * np.sqrt(256 / 3)
    err = np.abs(np.asarray(got) - exact)
    assert err.max() < bound and err.max() > 0

"""The public functions' contract: one-line errors for bad inputs before anything is lowered, tile
choice, frozen weights, leading dims."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reslm.kernels_pallas.quant_matmul import (
  BlockSizes,
  int4_matmul,
  int8_int8_matmul,
  int8_matmul,
  quantize_int4,
  quantize_int8,
)
from reslm.kernels_pallas.quant_matmul.config import make_config, tpu_tiles

K, N = 256, 64
X = jnp.ones((3, K), jnp.float32)
W8, S8 = quantize_int8(jnp.ones((K, N)))
W4, S4 = quantize_int4(jnp.ones((K, N)), 64)


def _int8(**kw):
  args = dict(x=X, w_q=W8, scales=S8)
  args.update({k: kw.pop(k) for k in list(kw) if k in args})
  return int8_matmul(args["x"], args["w_q"], args["scales"], **kw)


def _int4(**kw):
  args = dict(x=X, w_packed=W4, scales=S4, group_size=64)
  args.update({k: kw.pop(k) for k in list(kw) if k in args})
  return int4_matmul(args.pop("x"), args.pop("w_packed"), args.pop("scales"), **args, **kw)


def _w8a8(**kw):
  args = dict(x_q=jnp.ones((3, K), jnp.int8), w_q=W8, x_scale=jnp.ones((3,)), w_scale=S8)
  args.update({k: kw.pop(k) for k in list(kw) if k in args})
  return int8_int8_matmul(*args.values(), **kw)


@pytest.mark.parametrize(
  ("fn", "overrides", "match"),
  [
    (_int8, dict(x=jnp.ones((3, K), jnp.float16)), "dtype float16"),
    (_int8, dict(x=jnp.ones((3, K + 1))), "does not match"),
    (_int8, dict(w_q=W8.astype(jnp.int32)), "int8 array"),
    (_int8, dict(scales=jnp.ones((N + 1,))), "scales must be"),
    (_int8, dict(scales=jnp.ones((N,), jnp.int32)), "float array"),
    (_int8, dict(out_dtype=jnp.int8), "out_dtype"),
    (_int8, dict(implementation="triton"), "implementation='triton'"),
    (_int8, dict(block_sizes=(128, 128, 128)), "BlockSizes"),
    (_int8, dict(implementation="tpu", block_sizes=BlockSizes(block_n=32)), "block_n=32"),
    (_int8, dict(implementation="tpu", block_sizes=BlockSizes(block_k=64)), "block_k=64"),
    (_int8, dict(implementation="gpu", block_sizes=BlockSizes(block_m=24)), "block_m=24"),
    (_int8, dict(implementation="auto", block_sizes=BlockSizes(block_n=48)), "block_n=48"),
    (_int4, dict(group_size=16), "group_size=16"),
    (_int4, dict(scales=jnp.ones((K // 32, N))), "scales must be"),
    (_int4, dict(w_packed=W8), "w_packed shape"),
    (_int4, dict(implementation="tpu", block_sizes=BlockSizes(block_k=128)), "block_k=128"),
    (_w8a8, dict(x_q=jnp.ones((3, K))), "expected int8"),
    (_w8a8, dict(x_scale=None), "both"),
    (_w8a8, dict(x_scale=jnp.ones((4,))), "x_scale must be"),
  ],
)
def test_bad_arguments_raise_one_line_errors(fn, overrides, match):
  with pytest.raises(ValueError, match=match) as err:
    fn(**overrides)
  assert "\n" not in str(err.value) and str(err.value).startswith("quant_matmul: ")


def test_block_sizes_must_be_positive_ints():
  with pytest.raises(ValueError, match=r"block_sizes.block_k=0"):
    BlockSizes(block_k=0)


def test_tpu_tiles_avoid_padding_the_weights():
  """Default tiles shrink to divisors of N and K (no weight copy); short dims are one full tile."""
  x = jax.ShapeDtypeStruct((7, 3 * 640), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((3 * 640, 768), jnp.int8)
  s = jax.ShapeDtypeStruct((768,), jnp.float32)
  cfg = make_config(
    "int8", x, w, s, group_size=0, out_dtype=None, block_sizes=None, implementation="tpu",
    interpret=False,
  )  # fmt: skip
  t = tpu_tiles(cfg)
  assert (t.block_m, t.m) == (7, 7)
  assert t.n == 768 and 768 % t.block_n == 0 and t.block_n % 128 == 0
  assert t.k == 1920 and 1920 % t.block_k == 0 and t.block_k % 128 == 0


def test_weights_and_scales_are_frozen_and_leading_dims_kept():
  """Gradients reach x only; the weights' scales get exactly zero."""
  x = jax.random.normal(jax.random.key(0), (2, 3, K))

  def loss(x, s8, s4):
    a = int8_matmul(x, W8, s8, implementation="reference")
    b = int4_matmul(x, W4, s4, group_size=64, implementation="reference")
    assert a.shape == b.shape == (2, 3, N)
    return (a * b).sum()

  dx, ds8, ds4 = jax.grad(loss, argnums=(0, 1, 2))(x, S8, S4)
  assert float(jnp.abs(dx).max()) > 0
  np.testing.assert_array_equal(ds8, 0)
  np.testing.assert_array_equal(ds4, 0)

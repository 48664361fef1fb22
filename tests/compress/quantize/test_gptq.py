"""GPTQ against round-to-nearest at the same bits, and against qwix's GPTQ (an independent
implementation) on the same layer."""

import jax.numpy as jnp
import numpy as np
import pytest

from reslm.compress.quantize import rtn
from reslm.compress.quantize.gptq import gptq_quantize, hessian
from reslm.compress.registry import METHODS


def layer(k=64, n=24, m=512, seed=0, dead=True):
  """Weights and correlated inputs (GPTQ's gain over RTN comes from input correlations)."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(k, k)) / np.sqrt(k)
  x = rng.normal(size=(m, k)) @ mix + 0.1 * rng.normal(size=(m, k))
  if dead:
    x[:, 3] = 0.0  # A dead input feature.
  w = rng.normal(size=(k, n))
  return jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)


def out_error(x, w, w_hat):
  return float(jnp.linalg.norm(x @ (w - w_hat)) / jnp.linalg.norm(x @ w))


# Groups inside one lazy-update block (32 in 64), act-order with static groups, 8-bit per channel.
@pytest.mark.parametrize(
  "bits,group_size,block_size,act_order", [(4, 32, 64, False), (4, 32, 16, True), (8, 0, 16, False)]
)
def test_gptq_beats_round_to_nearest(bits, group_size, block_size, act_order):
  w, x = layer()
  q, scales, w_hat = gptq_quantize(
    w, hessian(x), bits=bits, group_size=group_size, block_size=block_size, act_order=act_order
  )
  qmax = 2 ** (bits - 1) - 1
  assert int(jnp.max(q)) <= qmax and int(jnp.min(q)) >= -qmax - 1
  assert bool(jnp.all(q[3] == 0))  # A dead input row quantizes to zero.
  # The returned integers and scales are what the dequantized weights are made of.
  step = jnp.repeat(scales, group_size, axis=0) if group_size else scales
  np.testing.assert_allclose(w_hat, q * step, rtol=1e-6)
  rtn_err = out_error(x, w, rtn.quantize_dequantize(w, bits, group_size or 32))
  assert out_error(x, w, w_hat) < 0.85 * rtn_err


def test_gptq_method_pads_k_and_packs():
  w, x = layer(k=40)  # 40 rows: padded to 64 for groups of 32.
  settings = METHODS["gptq"].settings({"bits": 4, "group_size": 32}, "t")
  r = METHODS["gptq"].fn(w, x, settings)
  assert r.arrays["w_packed"].shape == (32, 24) and r.arrays["scales"].shape == (2, 24)
  w_hat = r.cls.weight(r.arrays, r.static, 40)
  assert out_error(x, w, w_hat) < out_error(x, w, rtn.quantize_dequantize(w, 4, 32))


def test_gptq_matches_qwix():
  """Groups of 16 across lazy-update blocks of 8 (qwix runs eagerly per column: kept small)."""
  group_size, block_size = 16, 8
  try:
    from qwix._src.core import qarray
    from qwix.contrib import gptq_core
  except ImportError as e:  # qwix is an optional peer (requirements-bench.txt).
    pytest.skip(f"qwix not importable: {e}")
  # No dead input: qwix takes the dampening mean before setting dead diagonals to 1 (the
  # reference implementation, and this one, after).
  w, x = layer(k=32, n=16, m=256, dead=False)
  h = hessian(x)
  tiled = {1: group_size} if group_size else {}
  how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=[0], tiled_axes=tiled)
  q_qwix, _ = gptq_core.quantize_weight(w.T, h, how, blocksize=block_size, percdamp=0.01)
  w_qwix = qarray.dequantize(q_qwix).T
  # qwix's int4 grid: scale = max|w| / 7.5, values clipped to [-8, 7].
  _, _, w_hat = gptq_quantize(
    w, h, bits=4, group_size=group_size, block_size=block_size, scale_divisor=7.5
  )
  # Float summation order differs; a rounding tie may flip a level and the feedback after it.
  same = jnp.isclose(w_hat, w_qwix, rtol=1e-5, atol=1e-6)
  assert float(jnp.mean(same)) > 0.99
  np.testing.assert_allclose(out_error(x, w, w_hat), out_error(x, w, w_qwix), rtol=1e-2)

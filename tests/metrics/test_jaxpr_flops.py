"""The jaxpr FLOP counter against XLA's count of the same work written without loops.

XLA's `cost_analysis` counts a loop-free program exactly (it only undercounts loop bodies), and a
program made of matmuls alone has no elementwise work to tell the two conventions apart, so each
looped program here is compared with XLA's count of its hand-unrolled twin.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reslm.metrics import xla_cost
from reslm.metrics.jaxpr_flops import count_flops, xla_loop_free_flops


def _xla(fn, *args) -> float:
  return xla_cost(jax.jit(fn).lower(*args).compile())["flops"]


X = jnp.ones((8, 16))
W = jnp.ones((16, 16))


def _looped(x, w):
  def inner(c, _):
    return c @ w, None

  def outer(c, _):
    return jax.lax.scan(inner, c, None, length=3)[0], None

  x = jax.lax.scan(outer, x, None, length=2)[0]  # 2 × 3 matmuls
  x = jax.lax.fori_loop(0, 4, lambda i, c: c @ w, x)  # 4
  return jax.lax.map(lambda row: row @ w, x.reshape(2, 4, 16))  # 2


def _unrolled(x, w):
  for _ in range(2 * 3 + 4):
    x = x @ w
  return jnp.stack([row @ w for row in x.reshape(2, 4, 16)])


def test_loops_count_every_iteration_like_xla_on_the_unrolled_program():
  expected = _xla(_unrolled, X, W)
  assert expected == 10 * 2 * 8 * 16 * 16 + 2 * 2 * 4 * 16 * 16
  assert count_flops(_looped, X, W).flops == expected
  # What cost_analysis makes of the looped program: each body once.
  assert _xla(_looped, X, W) < expected / 2


def test_calls_remat_and_custom_derivatives_count_their_body_once():
  @jax.custom_vjp
  def custom(x, w):
    return x @ w

  custom.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

  @jax.custom_jvp
  def smooth(x):
    return x @ W

  smooth.defjvp(lambda p, t: (smooth(p[0]), t[0] @ W))

  def fn(x, w):
    x = jax.checkpoint(lambda x: x @ w)(x)
    x = jax.jit(lambda x: custom(x, w))(x)
    return smooth(x)

  assert count_flops(fn, X, W).flops == _xla(lambda x, w: x @ w @ w @ W, X, W)


def test_cond_counts_its_costliest_branch():
  def fn(p, x, w):
    return jax.lax.cond(p, lambda x: x @ w @ w, lambda x: x @ w, x)

  count = count_flops(fn, True, X, W)
  assert count.flops == _xla(lambda x, w: x @ w @ w, X, W)


def test_complex_matmul_counts_its_four_real_matmuls():
  a = jnp.ones((8, 16), jnp.complex64)
  b = jnp.ones((16, 4), jnp.complex64)
  re_a, re_b = jnp.ones((8, 16)), jnp.ones((16, 4))
  four = _xla(lambda a, b, c, d: (a @ c - b @ d, a @ d + b @ c), re_a, re_a, re_b, re_b)
  # The subtraction and addition are elementwise (8 × 4 each), outside the matmul count.
  assert count_flops(lambda a, b: a @ b, a, b).flops == four - 2 * 8 * 4


def test_ragged_dot_counts_each_row_against_its_own_group():
  sizes = (3, 0, 5, 2)
  x, w = jnp.ones((10, 16)), jnp.ones((4, 16, 8))
  group_sizes = jnp.asarray(sizes, jnp.int32)
  starts = np.cumsum((0,) + sizes)

  def per_group(x, w):
    return [x[starts[g] : starts[g + 1]] @ w[g] for g in range(len(sizes))]

  assert count_flops(jax.lax.ragged_dot, x, w, group_sizes).flops == _xla(per_group, x, w)
  # Its gradients are two ragged products of the same size (one contracts the ragged rows).
  grads = jax.grad(lambda x, w: jax.lax.ragged_dot(x, w, group_sizes).sum(), argnums=(0, 1))
  assert count_flops(grads, x, w).flops == 3 * _xla(per_group, x, w)


@pytest.mark.parametrize(
  "fn,arg",
  [
    (lambda z: jnp.fft.rfft(z, axis=1), jnp.ones((3, 64))),
    (lambda z: jnp.fft.irfft(z, n=64, axis=1), jnp.ones((3, 33), jnp.complex64)),
    (lambda z: jnp.fft.fft(z, axis=0), jnp.ones((32, 5), jnp.complex64)),
  ],
)
def test_fft_follows_xla(fn, arg):
  assert count_flops(fn, arg).flops == _xla(fn, arg)


def test_convolution_follows_xla():
  x, k = jnp.ones((2, 3, 16, 16)), jnp.ones((4, 3, 3, 3))

  def conv(x, k):  # Unpadded: XLA skips taps that fall on padding, this counter does not.
    return jax.lax.conv_general_dilated(x, k, (2, 1), "VALID")

  assert count_flops(conv, x, k).flops == _xla(conv, x, k)


def test_matmul_inputs_follow_weights_through_views_and_scans():
  params = {
    "table": jnp.ones((32, 16)),  # looked up only: not a matmul weight
    "stacked": jnp.ones((2, 16, 16)),  # scanned over, cast and reshaped, then multiplied
    "pair": (jnp.ones((16, 8)), jnp.ones((16, 8))),  # stacked into one fused matmul
    "scale": jnp.ones((16,)),  # multiplied elementwise, even though the product then meets a dot
    "head": jnp.ones((16, 4)),
  }

  def fn(p, ids):
    x = p["table"][ids]  # [5, 16]

    def layer(x, w):
      return x @ w.astype(jnp.bfloat16).reshape(16, 16).astype(x.dtype), None

    x = jax.lax.scan(layer, x, p["stacked"])[0]
    fused = jnp.einsum("td,dln->tln", x, jnp.stack(p["pair"], axis=1)).reshape(5, 16)
    return (fused * p["scale"]) @ p["head"]

  leaves = jax.tree.leaves(params)
  count = count_flops(fn, params, jnp.arange(5))
  names = {"head": 0, "pair0": 1, "pair1": 2, "scale": 3, "stacked": 4, "table": 5}
  assert [leaves[i].shape for i in names.values()] == [
    (16, 4),
    (16, 8),
    (16, 8),
    (16,),
    (2, 16, 16),
    (32, 16),
  ]
  assert count.matmul_inputs == {names[n] for n in ("head", "pair0", "pair1", "stacked")}


def test_loops_with_a_traced_trip_count_are_reported_uncounted():
  def fn(n, x, w):
    return jax.lax.fori_loop(0, n, lambda i, c: c @ w, x)

  count = count_flops(fn, 3, X, W)
  assert count.uncounted == ("while (body counted once)",)
  assert count.flops == 2 * 8 * 16 * 16
  assert count_flops(_looped, X, W).uncounted == ()


def test_xla_loop_free_count_equals_xla_on_the_hand_unrolled_program():
  def looped(x, w):
    def inner(c, _):
      return jnp.tanh(c @ w) + 1.0, None

    x = jax.lax.scan(lambda c, _: (jax.lax.scan(inner, c, None, length=3)[0], None), x, None, 2)[0]
    return jax.lax.map(lambda row: jnp.sin(row @ w) * 2.0, x.reshape(2, 4, 16))

  def unrolled(x, w):
    for _ in range(6):
      x = jnp.tanh(x @ w) + 1.0
    return jnp.stack([jnp.sin(row @ w) * 2.0 for row in x.reshape(2, 4, 16)])

  expected = xla_cost(jax.jit(unrolled).lower(X, W))["flops"]  # Lowered, as the count is.
  assert xla_loop_free_flops(looped, X, W) == expected
  assert xla_cost(jax.jit(looped).lower(X, W))["flops"] < expected / 2  # Bodies once.

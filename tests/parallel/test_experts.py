"""Expert-parallel MoE (all-to-all dispatch) against the MoE layer applied per token group."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from reslm.models.moe import MoE
from reslm.parallel import experts


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "expert"))


def ep_apply(graphdef, state, x, mesh):
  return experts.moe_all_to_all(nnx.merge(graphdef, state), x, mesh=mesh)


@pytest.mark.parametrize("capacity_factor", [1.0, 4.0])
def test_all_to_all_moe_equals_moe_on_each_device_group(mesh, capacity_factor):
  """Each device routes its own tokens with its own capacity (GShard groups): the result is the
  MoE layer applied to each group separately; with capacity_factor = E / k nothing is dropped
  and it is the MoE layer on all tokens. Auxiliary losses use global statistics: always equal."""
  moe = MoE(16, 32, 8, top_k=2, capacity_factor=capacity_factor, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(moe)
  x = jax.random.normal(jax.random.key(1), (8, 6, 16))
  y, aux = jax.jit(functools.partial(ep_apply, graphdef, mesh=mesh))(
    state, jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
  )
  groups = x.reshape(8, -1, 16)  # Device (i, j) holds token block 4 i + j.
  per_group = jnp.stack([moe(g)[0] for g in groups]).reshape(x.shape)
  np.testing.assert_allclose(y, per_group, rtol=1e-5, atol=1e-6)
  whole, whole_aux = moe(x)
  np.testing.assert_allclose(aux, whole_aux, rtol=1e-5)
  if capacity_factor >= 8 / 2:
    np.testing.assert_allclose(y, whole, rtol=1e-5, atol=1e-6)
  else:
    assert not np.allclose(y, whole, atol=1e-6)  # Drops differ between grouping choices.


def test_gradients_match_without_drops(mesh):
  moe = MoE(16, 32, 8, top_k=2, capacity_factor=4.0, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(moe)
  x = jax.random.normal(jax.random.key(2), (8, 6, 16))

  def loss(apply, state, x):
    y, aux = apply(state, x)
    return jnp.sum(y**2) + aux

  ep = functools.partial(ep_apply, graphdef, mesh=mesh)
  grads = jax.jit(jax.grad(functools.partial(loss, ep), argnums=(0, 1)))(state, x)
  ref = jax.grad(functools.partial(loss, lambda s, x: nnx.merge(graphdef, s)(x)), argnums=(0, 1))(
    state, x
  )
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6 * np.abs(r).max())


def test_experts_not_dividing_the_axis_is_an_error(mesh):
  moe = MoE(16, 32, 6, top_k=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_experts=6 is not divisible by parallel.expert=4"):
    experts.moe_all_to_all(moe, jnp.zeros((8, 6, 16)), mesh=mesh)

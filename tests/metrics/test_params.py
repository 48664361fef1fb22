"""Tests for parameter counting on concrete, abstract and nnx pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reslm.metrics import params


def _tree():
  return {
    "a": jnp.zeros((3, 4), jnp.float32),
    "b": [np.zeros(5, np.float32), jax.ShapeDtypeStruct((2, 2, 2), jnp.bfloat16)],
  }


def test_count_params_known_tree():
  assert params.count_params(_tree()) == 3 * 4 + 5 + 2 * 2 * 2


def test_param_bytes_known_tree():
  assert params.param_bytes(_tree()) == 12 * 4 + 5 * 4 + 8 * 2


def test_nnx_state_concrete_and_abstract():
  model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  expected = 3 * 4 + 4
  assert params.count_params(nnx.state(model, nnx.Param)) == expected
  abstract = nnx.eval_shape(lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
  assert params.count_params(nnx.state(abstract, nnx.Param)) == expected
  assert params.param_bytes(nnx.state(abstract, nnx.Param)) == expected * 4


def test_empty_tree():
  assert params.count_params({}) == 0
  assert params.param_bytes(None) == 0

"""Memory levers together: optimizer state offloaded to host memory, remat, gradient accumulation.

They change where and when things are stored, never the numbers: losses match a plain run.
"""

import dataclasses
import types

import jax
import numpy as np
import pytest

from reslm.models import ModelConfig
from reslm.parallel import rules as rules_lib
from tests.parallel import common

TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_dim=64)


def train(model, train_cfg, initial, **settings):
  pcfg = common.parallel_config("fsdp", fsdp=8, **settings)
  mesh = common.mesh_lib.make_mesh(pcfg)
  place = common.loop.placement(model, train_cfg, pcfg, mesh)
  graphdef, tx = common.loop.abstract_state(model, train_cfg)[::2]
  state = jax.device_put(initial, place.state)
  step_fn, _ = common.loop.jit_steps(graphdef, tx, place, train_cfg)
  batches = [jax.device_put(common.batch(i, model), place.batch) for i in range(2)]
  step = common.compile_fn(step_fn, state, batches[0])
  losses = []
  for b in batches:
    state, metrics = step(state, b)
    losses.append(float(metrics["loss"]))
  return np.array(losses), state


def test_offload_remat_and_accumulation_leave_losses_unchanged():
  initial = jax.device_get(common.loop.init_state(TINY, common.train_config(), seed=0)[1])
  plain, _ = train(TINY, common.train_config(), initial)
  levers, state = train(
    dataclasses.replace(TINY, remat="full"),
    common.train_config(grad_accum_steps=2),
    initial,
    offload_opt_state=True,
  )
  np.testing.assert_allclose(levers, plain, rtol=2e-5)
  adam = state.opt_state[1][0]  # clip -> (adam state, ...): mu and nu mirror the parameters.
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves((adam.mu, adam.nu))}
  assert kinds == {"pinned_host"}
  assert {x.sharding.memory_kind for x in jax.tree.leaves(state.params)} == {"device"}


def test_offload_without_host_memory_is_a_clear_error():
  device = types.SimpleNamespace(
    platform="fancy", addressable_memories=lambda: [types.SimpleNamespace(kind="device")]
  )
  mesh = types.SimpleNamespace(devices=np.array([device]))
  with pytest.raises(ValueError, match="offload_opt_state=True needs a 'pinned_host'.*fancy"):
    rules_lib.check_offload(mesh)

"""Pipeline schedules: the bubble, and outputs and gradients equal to the unpipelined model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from reslm.models import build_model
from reslm.parallel import comm
from reslm.parallel import pipeline as pl
from reslm.parallel import rules as rules_lib
from tests.parallel import common


@pytest.mark.parametrize("stages, micro, laps", [(4, 4, 1), (4, 8, 1), (2, 4, 2), (4, 4, 3)])
def test_schedule_table_and_bubble(stages, micro, laps):
  table = pl.schedule_table(stages, micro, laps)
  idle = sum(cell is None for row in table for cell in row)
  assert idle / (len(table) * stages) == pytest.approx(pl.bubble_fraction(stages, micro, laps))
  # Every stage does every (microbatch, lap) once; stage s + 1 one step after stage s; a lap
  # starts on stage 0 only after the previous lap left the last stage.
  when = {(s, cell): t for t, row in enumerate(table) for s, cell in enumerate(row) if cell}
  items = [(m, k) for k in range(laps) for m in range(micro)]
  assert len(when) == stages * len(items)
  for m, k in items:
    for s in range(stages - 1):
      assert when[(s + 1, (m, k))] == when[(s, (m, k))] + 1
    if k:
      assert when[(0, (m, k))] > when[(stages - 1, (m, k - 1))]


def toy_stage(params, x):
  def layer(x, p):
    return jnp.tanh(x @ p["w"] + p["b"]), None

  return jax.lax.scan(layer, x, params)[0]


@pytest.mark.parametrize("schedule, micro, laps", [("gpipe", 4, 1), ("circular", 4, 2)])
def test_pipeline_equals_sequential_layers(schedule, micro, laps):
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "pipeline"))
  keys = jax.random.split(jax.random.key(0), 3)
  params = {
    "w": jax.random.normal(keys[0], (8, 16, 16)) / 4,
    "b": jax.random.normal(keys[1], (8, 16)) / 10,
  }
  x = jax.random.normal(keys[2], (16, 5, 16))
  run = functools.partial(
    pl.pipeline, toy_stage, mesh=mesh, microbatches=micro, schedule=schedule, repeats=laps
  )
  placed = jax.device_put(params, NamedSharding(mesh, P("pipeline")))
  xd = jax.device_put(x, NamedSharding(mesh, P("data")))
  loss = lambda f: lambda p, x: jnp.sum(f(p, x) ** 2)
  out, grads = jax.jit(jax.value_and_grad(loss(lambda p, x: run(p, x)), argnums=(0, 1)))(placed, xd)
  ref, ref_grads = jax.value_and_grad(loss(toy_stage), argnums=(0, 1))(params, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max())


@pytest.fixture(scope="module")
def four_layers():
  """A 4-layer reference model, its tokens, and the unpipelined logits and gradients."""
  cfg = common.MODEL  # 4 layers.
  graphdef, params = nnx.split(build_model(cfg))
  params = nnx.to_pure_dict(params)
  tokens = jnp.asarray(common.batch(0, cfg)["inputs"])
  loss = functools.partial(_loss, graphdef, tokens, lambda model, t: model(t))
  ref_grads, ref_logits = jax.jit(jax.grad(loss, has_aux=True))(params)
  return cfg, graphdef, params, tokens, ref_logits, ref_grads


def _loss(graphdef, tokens, forward, params):
  out = forward(nnx.merge(graphdef, params), tokens)
  return jnp.mean(out.logits**2), out.logits


@pytest.mark.parametrize("schedule", ["gpipe", "circular"])
def test_decoder_forward_equals_model(schedule, four_layers):
  """The train step's pipelined forward: the same logits and gradients as model(tokens)."""
  cfg, graphdef, params, tokens, ref_logits, ref_grads = four_layers
  place = common.placement("dp_pp", {"data": 4, "pipeline": 2}, model=cfg)
  forward = functools.partial(
    pl.decoder_forward, mesh=place.mesh, microbatches=4, schedule=schedule, repeats=2
  )
  loss = functools.partial(_loss, graphdef, tokens, forward)
  piped = jax.jit(rules_lib.with_rules(jax.grad(loss, has_aux=True), place.mesh, place.rules))
  placed = jax.device_put(params, place.state.params)
  compiled = piped.lower(placed).compile()
  grads, logits = compiled(placed)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
  # The pipeline really runs: each of the r·M + p − 1 steps passes a microbatch's activations
  # [16 / 4 data / 4 microbatches, seq, d] to the next stage, forward and (transposed) backward.
  steps = (2 if schedule == "circular" else 1) * 4 + 2 - 1
  act_bytes = 16 // 4 // 4 * tokens.shape[1] * cfg.d_model * 4
  ops = [op for op in comm.parse_hlo(compiled.as_text()) if op.kind == "collective-permute"]
  assert [(op.count, op.bytes) for op in ops] == [(steps, act_bytes)] * 2
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  jax.tree.map(
    lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * scale), grads, ref_grads
  )


def test_layers_not_divisible_by_stages_is_one_line_error():
  with pytest.raises(ValueError, match="3 stacked layer groups do not split into") as err:
    pl.check(3, 2, 2, 8, "gpipe", 1)
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="needs parallel.pipeline_microbatches=2 >= "):
    pl.check(4, 4, 2, 8, "circular", 1)

"""Train step, optimizer and non-finite handling.

Checks that gradient accumulation reproduces the one-batch update, that several steps in one
compiled call equal the same steps one by one, that the reported loss is the weighted mean
cross-entropy of the model's logits, that a NaN/Inf step leaves the state untouched and is
recorded, that the host loop stops (or not) per `train.nonfinite`, the learning-rate schedule's
anchor points, and which parameters weight decay applies to.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reslm.models import ModelConfig, build_model
from reslm.training import NonFiniteLossError, TrainState, build_optimizer, learning_rate_schedule
from reslm.training import config as config_lib
from reslm.training import loop as loop_lib
from reslm.training.steps import make_multi_step, make_train_step

VOCAB = 29
SEQ = 12


def train_cfg(**overrides):
  cfg = config_lib.get_train_defaults()
  cfg.update({**dict(learning_rate=1e-2, warmup_steps=0, decay_steps=100, steps=100), **overrides})
  return cfg


def tiny_model(**overrides):
  cfg = ModelConfig(
    **{
      **dict(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, max_seq_len=SEQ),
      **overrides,
    }
  )
  return build_model(cfg, seed=0)


def setup_state(tc, **model_overrides):
  graphdef, params = nnx.split(tiny_model(**model_overrides))
  params = nnx.to_pure_dict(params)
  tx = build_optimizer(tc, params)
  return graphdef, TrainState.create(params, tx), tx


@pytest.fixture(scope="module")
def steps():
  """One model and optimizer, with its jitted train steps compiled once for the module."""
  graphdef, state, tx = setup_state(train_cfg(), num_layers=1)
  fns = {}

  def get(grad_accum_steps=1, nonfinite="stop"):
    key = (grad_accum_steps, nonfinite)
    if key not in fns:
      fns[key] = jax.jit(
        make_train_step(graphdef, tx, grad_accum_steps=grad_accum_steps, nonfinite=nonfinite)
      )
    return fns[key]

  return graphdef, state, get


def make_batch(batch=8, seed=0):
  rng = np.random.default_rng(seed)
  weights = (rng.random((batch, SEQ)) < 0.6).astype(np.float32)
  weights[0] = 0.0  # Microbatches with very different token counts (one with few).
  weights[1, :2] = 1.0
  return {
    "inputs": jnp.asarray(rng.integers(0, VOCAB, (batch, SEQ)), jnp.int32),
    "targets": jnp.asarray(rng.integers(0, VOCAB, (batch, SEQ)), jnp.int32),
    "weights": jnp.asarray(weights),
  }


def assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_grad_accumulation_equals_one_big_batch(steps):
  _, state, get = steps
  batch = make_batch()
  one, four = get(1), get(4)
  s1, m1 = one(state, batch)
  s4, m4 = four(state, batch)
  # Two steps, so the second update also depends on the accumulated optimizer moments.
  s1, m1b = one(s1, make_batch(seed=1))
  s4, m4b = four(s4, make_batch(seed=1))
  for a, b in ((m1, m4), (m1b, m4b)):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    np.testing.assert_allclose(a["accuracy"], b["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    assert float(a["tokens"]) == float(b["tokens"])
  assert_trees_close(s1.params, s4.params, rtol=1e-5, atol=1e-6)
  assert_trees_close(s1.opt_state, s4.opt_state, rtol=1e-5, atol=1e-8)
  # The update is real: parameters moved by far more than the tolerance.
  moved = jax.tree.leaves(
    jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), s1.params, state.params)
  )
  assert max(moved) > 1e-3


def test_multi_step_equals_sequential_steps(steps):
  graphdef, state, get = steps
  tx = build_optimizer(train_cfg(), state.params)
  multi = jax.jit(make_multi_step(make_train_step(graphdef, tx), 3))
  batches = [make_batch(seed=10 + i) for i in range(3)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  got, got_metrics = multi(state, stacked)
  want, losses = state, []
  for batch in batches:
    want, m = get(1)(want, batch)
    losses.append(float(m["loss"]))
  assert int(got.step) == int(want.step) == 3
  np.testing.assert_allclose(np.asarray(got_metrics["loss"]), losses, rtol=1e-6)
  assert_trees_close(got.params, want.params, rtol=1e-5, atol=1e-7)
  assert_trees_close(got.opt_state, want.opt_state, rtol=1e-5, atol=1e-9)


def _reference_loss(model, batch):
  logits = np.asarray(model(batch["inputs"]).logits, np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = np.asarray(batch["targets"])
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  w = np.asarray(batch["weights"], np.float64)
  correct = (logits.argmax(-1) == targets) * w
  return (ce * w).sum() / w.sum(), correct.sum() / w.sum(), w.sum()


@pytest.mark.parametrize("grad_accum_steps", [1, 4])
def test_loss_is_weighted_mean_cross_entropy(steps, grad_accum_steps):
  graphdef, state, get = steps
  batch = make_batch(seed=3)
  _, metrics = get(grad_accum_steps)(state, batch)
  model = nnx.merge(graphdef, state.params)
  loss, accuracy, tokens = _reference_loss(model, batch)
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), accuracy, rtol=1e-5)
  assert float(metrics["tokens"]) == tokens


def _poison_params(params):
  params = jax.tree.map(lambda x: x, params)
  scale = np.asarray(params["final_norm"]["scale"]).copy()
  scale[0] = np.nan
  params["final_norm"]["scale"] = jnp.asarray(scale)
  return params


def _poison_batch(batch):
  weights = np.asarray(batch["weights"]).copy()
  weights[1, 0] = np.inf  # Weighted loss sum is +inf -> non-finite loss.
  return {**batch, "weights": jnp.asarray(weights)}


@pytest.mark.parametrize("policy", ["stop", "skip"])
@pytest.mark.parametrize("poison", ["params", "batch"])
def test_nonfinite_step_leaves_state_unchanged(steps, policy, poison):
  _, state, get = steps
  step_fn = get(1, policy)
  state, _ = step_fn(state, make_batch(seed=1))  # One good step: non-trivial optimizer state.
  state = state.replace(step=jnp.asarray(7, jnp.int32))
  batch = make_batch(seed=2)
  if poison == "params":
    state = state.replace(params=_poison_params(state.params))
  else:
    batch = _poison_batch(batch)
  new, metrics = step_fn(state, batch)
  assert not np.isfinite(float(metrics["loss"]))
  assert_trees_equal(new.params, state.params)  # NaNs compare equal in assert_array_equal.
  assert_trees_equal(new.opt_state, state.opt_state)
  assert int(new.step) == 8
  assert int(new.first_nonfinite_step) == 7
  assert int(new.nonfinite_count) == 1


def test_nonfinite_first_step_is_kept_and_count_accumulates(steps):
  _, state, get = steps
  step_fn = get(1)
  assert int(state.first_nonfinite_step) == -1
  state, _ = step_fn(state, make_batch(seed=1))
  assert int(state.first_nonfinite_step) == -1 and int(state.nonfinite_count) == 0
  state, _ = step_fn(state, _poison_batch(make_batch(seed=2)))  # step 1
  state, _ = step_fn(state, make_batch(seed=3))  # A finite step in between updates normally.
  state, _ = step_fn(state, _poison_batch(make_batch(seed=4)))  # step 3
  assert int(state.step) == 4
  assert int(state.first_nonfinite_step) == 1
  assert int(state.nonfinite_count) == 2


def _state_with(first: int, count: int):
  return TrainState(
    step=jnp.asarray(12, jnp.int32),
    params={},
    opt_state=(),
    first_nonfinite_step=jnp.asarray(first, jnp.int32),
    nonfinite_count=jnp.asarray(count, jnp.int32),
  )


def test_check_nonfinite_stop_raises_naming_the_step():
  with pytest.raises(NonFiniteLossError, match=r"\bstep 5\b"):
    loop_lib._check_nonfinite(_state_with(5, 2), "stop")


def test_check_nonfinite_skip_and_finite_do_not_raise():
  loop_lib._check_nonfinite(_state_with(5, 2), "skip")
  loop_lib._check_nonfinite(_state_with(-1, 0), "stop")
  loop_lib._check_nonfinite(_state_with(-1, 0), "skip")


def test_learning_rate_schedule_anchor_points():
  tc = train_cfg(learning_rate=2e-3, end_learning_rate=2e-4, warmup_steps=10, decay_steps=50)
  lr = learning_rate_schedule(tc)
  np.testing.assert_allclose(float(lr(0)), 0.0, atol=1e-12)
  np.testing.assert_allclose(float(lr(5)), 1e-3, rtol=1e-5)  # Linear warmup.
  np.testing.assert_allclose(float(lr(10)), 2e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(30)), (2e-3 + 2e-4) / 2, rtol=1e-5)  # Cosine midpoint.
  np.testing.assert_allclose(float(lr(50)), 2e-4, rtol=1e-5)
  np.testing.assert_allclose(float(lr(80)), 2e-4, rtol=1e-5)
  values = [float(lr(s)) for s in range(51)]
  assert max(values) == pytest.approx(2e-3, rel=1e-6)
  assert all(a <= b for a, b in zip(values[:10], values[1:11], strict=True))
  assert all(a >= b for a, b in zip(values[10:50], values[11:51], strict=True))


def test_learning_rate_decay_steps_zero_means_train_steps():
  tc = train_cfg(
    learning_rate=1e-3, end_learning_rate=1e-5, warmup_steps=4, decay_steps=0, steps=40
  )
  lr = learning_rate_schedule(tc)
  np.testing.assert_allclose(float(lr(4)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(40)), 1e-5, rtol=1e-5)
  assert float(lr(20)) > 1e-5 * 10


def _decayed(params, tc) -> dict:
  """Which leaves weight decay moves: one AdamW update with zero gradients."""
  tx = build_optimizer(tc, params)

  @jax.jit
  def update(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    return jax.tree.map(lambda u: jnp.any(u != 0), updates)

  return jax.tree.map(bool, update(params))


def test_weight_decay_mask_on_synthetic_tree():
  tc = train_cfg(weight_decay=0.1)
  params = {
    "embed": {"embedding": jnp.ones((5, 4))},
    "final_norm": {"scale": jnp.ones((4,))},
    "bias": jnp.ones((4,)),
    "layers": {"norm": {"scale": jnp.ones((3, 4))}, "w": {"kernel": jnp.ones((3, 4, 4))}},
  }
  decayed = _decayed(params, tc)
  assert decayed == {
    "embed": {"embedding": True},
    "final_norm": {"scale": False},
    "bias": False,
    "layers": {"norm": {"scale": False}, "w": {"kernel": True}},
  }


@pytest.mark.parametrize("scan_layers", [True, False])
def test_weight_decay_mask_on_model_params(scan_layers):
  tc = train_cfg(weight_decay=0.1)
  _, params = nnx.split(tiny_model(scan_layers=scan_layers, tie_embeddings=False))
  params = nnx.to_pure_dict(params)
  decayed = _decayed(params, tc)
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): (leaf, np.ndim(p))
    for (path, leaf), p in zip(
      jax.tree_util.tree_flatten_with_path(decayed)[0], jax.tree.leaves(params), strict=True
    )
  }
  scales = {k: v for k, v in flat.items() if k.endswith("scale")}
  assert any(k.startswith("layers/") for k in scales)
  for key, (is_decayed, ndim) in scales.items():
    assert not is_decayed, key
    assert ndim == (2 if key.startswith("layers/") else 1), key  # Stacked norms are rank 2.
  matrices = {k: v for k, v in flat.items() if not k.endswith("scale") and v[1] >= 2}
  assert "embed/embedding" in matrices and any(k.startswith("layers/") for k in matrices)
  for key, (is_decayed, ndim) in matrices.items():
    if key.startswith("layers/") and ndim == 2:
      continue  # A stacked vector (e.g. a bias); covered by the synthetic tree.
    assert is_decayed, key

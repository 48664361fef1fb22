"""Checkpointer: exact round trips, clear errors on a different model, best-by-eval-loss, load_run.

A checkpoint must restore bit-for-bit into the same structure; restoring into another shape or
model must fail with a one-line ValueError that names what differs; `best/` holds only the
checkpoint with the lowest eval loss; and `load_run` refuses a directory that holds no run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reslm.models import ModelConfig, build_model
from reslm.training import Checkpointer, TrainState, build_optimizer, load_run
from reslm.training import config as config_lib

MODEL = dict(vocab_size=23, d_model=16, num_layers=2, num_heads=2, max_seq_len=8)


def make_state(**model_overrides):
  cfg = ModelConfig(**{**MODEL, **model_overrides})
  graphdef, params = nnx.split(build_model(cfg, seed=0))
  params = nnx.to_pure_dict(params)
  tc = config_lib.get_train_defaults()
  tc.update(dict(warmup_steps=0, decay_steps=10))
  tx = build_optimizer(tc, params)
  return cfg, graphdef, tx, TrainState.create(params, tx)


def meta_for(cfg: ModelConfig) -> dict:
  return {"model": cfg.to_dict(), "tokenizer": None}


@pytest.fixture(scope="module")
def trained():
  """A TrainState with distinct, non-initial values in every leaf (as after training).

  Values are filled in on the host from the abstract state, so nothing is compiled.
  """
  cfg = ModelConfig(**MODEL)
  abstract = jax.eval_shape(lambda: make_state()[3])

  def fill(x, offset):
    if not np.issubdtype(x.dtype, np.floating):
      return jnp.full(x.shape, offset + 2, x.dtype)
    ramp = np.arange(x.size, dtype=np.float64).reshape(x.shape)
    return jnp.asarray(np.sin(ramp + offset) + 0.25, x.dtype)

  leaves, treedef = jax.tree.flatten(abstract)
  state = jax.tree.unflatten(treedef, [fill(x, i) for i, x in enumerate(leaves)])
  state = state.replace(
    first_nonfinite_step=jnp.asarray(1, jnp.int32), nonfinite_count=jnp.asarray(3, jnp.int32)
  )
  return cfg, state


def zeros_like_state(state):
  return jax.tree.map(jnp.zeros_like, state)


def test_save_restore_round_trips_exactly(tmp_path, trained):
  cfg, state = trained
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, state, meta_for(cfg))
  ckpt.wait()
  restored, meta, step = ckpt.restore(zeros_like_state(state))
  ckpt.close()
  assert step == 2
  assert meta == meta_for(cfg)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(restored.nonfinite_count) == 3 and int(restored.first_nonfinite_step) == 1


def test_restore_latest_of_several_and_async_save(tmp_path, trained):
  cfg, state = trained
  ckpt = Checkpointer(str(tmp_path), keep=2, async_save=True)
  for s in (1, 2, 3):
    ckpt.save(s, state.replace(step=jnp.asarray(s, jnp.int32)), meta_for(cfg))
  ckpt.wait()
  assert ckpt.latest.all_steps() == [2, 3]  # keep=2 most recent.
  restored, _, step = ckpt.restore(zeros_like_state(state))
  assert step == 3 and int(restored.step) == 3
  restored, _, step = ckpt.restore(zeros_like_state(state), step=2)
  assert step == 2 and int(restored.step) == 2
  ckpt.close()


def test_restore_into_different_shape_is_one_line_error(tmp_path, trained):
  cfg, state = trained
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, state, meta_for(cfg))
  ckpt.wait()
  other = jax.eval_shape(lambda: make_state(d_model=32)[3])
  with pytest.raises(ValueError) as err:
    ckpt.restore(other)
  ckpt.close()
  msg = str(err.value)
  assert "\n" not in msg
  assert "(23, 16)" in msg and "(23, 32)" in msg, msg


def test_restore_with_different_model_meta_raises(tmp_path, trained):
  cfg, state = trained
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, state, meta_for(cfg))
  ckpt.wait()
  other = ModelConfig(**{**MODEL, "norm_eps": 1e-5})  # Same shapes, different model.
  with pytest.raises(ValueError, match="different model") as err:
    ckpt.restore(zeros_like_state(state), expected_meta=meta_for(other))
  assert "norm_eps" in str(err.value) and "\n" not in str(err.value)
  # The same meta restores.
  restored, _, _ = ckpt.restore(zeros_like_state(state), expected_meta=meta_for(cfg))
  np.testing.assert_array_equal(
    np.asarray(restored.params["embed"]["embedding"]),
    np.asarray(state.params["embed"]["embedding"]),
  )
  ckpt.close()


def test_restore_without_checkpoint_raises(tmp_path, trained):
  _, state = trained
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  with pytest.raises(ValueError, match="no checkpoint"):
    ckpt.restore(state)
  with pytest.raises(ValueError, match="no checkpoint"):
    ckpt.restore(state, best=True)
  ckpt.close()


def test_best_keeps_only_the_lowest_eval_loss(tmp_path, trained):
  cfg, state = trained
  ckpt = Checkpointer(str(tmp_path), keep=5, async_save=False)
  losses = {1: 3.0, 2: 2.0, 3: 5.0, 4: 2.5, 5: float("nan")}
  for s, loss in losses.items():
    ckpt.save_best(s, state.replace(step=jnp.asarray(s, jnp.int32)), meta_for(cfg), loss)
  ckpt.wait()
  assert ckpt.best.all_steps() == [2]
  assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["2"]
  restored, _, step = ckpt.restore(zeros_like_state(state), best=True)
  assert step == 2 and int(restored.step) == 2
  ckpt.close()


def test_load_run_without_config_json_raises(tmp_path):
  with pytest.raises(ValueError, match="config.json"):
    load_run(str(tmp_path))
  with pytest.raises(ValueError, match="config.json"):
    load_run(str(tmp_path / "missing"))

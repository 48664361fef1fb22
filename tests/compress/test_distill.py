"""Distillation: the losses against their formulas, the frozen teacher, and runs through the loop.

The loop tests share one `shakespeare_char.py:smoke` teacher (20 steps) and distil it into the
`distill.py:smoke` student: white-box with hidden-state MSE through `train_and_evaluate` (checks
the KL to the teacher falls and that an interrupted run resumes exactly, projections included),
and black-box through the loop's `distill.setup` hook (the saved corpus is the teacher's
deterministic sample and the train batches are its rows).
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import distill as distill_configs
from experiments.configs import shakespeare_char
from reslm import data as data_lib
from reslm.compress import distill
from reslm.models import ModelConfig, build_model
from reslm.training import (
  Checkpointer,
  load_run,
  model_config,
  train_and_evaluate,
  validate_experiment,
)
from reslm.training.steps import OBJECTIVE_PARAMS
from tests.shared_runs import pseudo_english, shared_dir


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _logits(seed, shape=(2, 3, 7), scale=3.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


kl = jax.jit(distill.soft_kl)  # One compile instead of one per op.


def test_soft_kl_equals_its_formula_and_is_zero_on_equal_logits():
  t, s = _logits(0), _logits(1)
  for temp in (1.0, 2.5):
    p, q = _softmax(t.astype(np.float64) / temp), _softmax(s.astype(np.float64) / temp)
    expected = np.sum(p * np.log(p / q), axis=-1)
    np.testing.assert_allclose(kl(t, s, temp), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kl(t, t, 2.0), 0.0, atol=1e-6)


def test_logit_losses_mix_and_gradient_match_the_formula():
  t, s = _logits(2), _logits(3)
  targets = np.random.default_rng(4).integers(0, 7, size=(2, 3))
  temp, alpha = 3.0, 0.3
  losses = jax.jit(distill.logit_losses, static_argnames=("temperature", "alpha"))
  total, ce, soft = losses(s, t, targets, temperature=temp, alpha=alpha)
  logq = np.log(_softmax(s.astype(np.float64)))
  expected_ce = -np.take_along_axis(logq, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(ce, expected_ce, rtol=1e-5)
  np.testing.assert_allclose(total, (1 - alpha) * ce + alpha * temp**2 * soft, rtol=1e-6)
  # d/ds [T^2 KL(p_T || q_T)] = T (softmax(s / T) - softmax(t / T)): the T^2 factor keeps the soft
  # gradient's scale; the CE part adds softmax(s) - onehot.
  grad = jax.jit(
    jax.grad(lambda z: jnp.sum(losses(z, t, targets, temperature=temp, alpha=alpha)[0]))
  )(s)
  onehot = np.eye(7)[targets]
  expected = (1 - alpha) * (_softmax(s) - onehot) + alpha * temp * (
    _softmax(s / temp) - _softmax(t / temp)
  )
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_high_temperature_limit_is_logit_matching():
  # Hinton et al.: as T grows, T^2 KL -> sum((s - t)^2) / (2 V) for zero-mean logits.
  t, s = _logits(5, scale=1.0), _logits(6, scale=1.0)
  t, s = t - t.mean(-1, keepdims=True), s - s.mean(-1, keepdims=True)
  limit = np.sum((s - t) ** 2, -1) / (2 * t.shape[-1])
  at = lambda temp: temp**2 * np.asarray(kl(t, s, temp))
  np.testing.assert_allclose(at(200.0), limit, rtol=2e-2)
  assert np.max(np.abs(at(1.0) - limit) / limit) > 0.05  # Not already there at T = 1.


def test_hidden_mse_with_projection_equals_naive_loop():
  rng = np.random.default_rng(7)
  hs = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # [pairs, batch, seq, student_dim]
  ht = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  proj = distill.HiddenProjection(2, 5, 6, rngs=nnx.Rngs(params=0))
  w = np.asarray(proj.kernel[...])
  expected = np.zeros((3, 4))
  for p in range(2):
    for b in range(3):
      for i in range(4):
        expected[b, i] += np.mean((hs[p, b, i] @ w[p] - ht[p, b, i]) ** 2) / 2
  mse = nnx.jit(distill.hidden_mse)
  np.testing.assert_allclose(mse(hs, ht, proj), expected, rtol=1e-5)
  same = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  np.testing.assert_allclose(
    mse(same, ht, None), np.mean((same - ht) ** 2, axis=(0, -1)), rtol=1e-6
  )


def test_layer_pairs_default_and_bad_index():
  assert distill.layer_pairs("", 2, 4) == [(1, 2), (2, 4)]
  assert distill.layer_pairs("0:0, 2:3", 2, 4) == [(0, 0), (2, 3)]
  with pytest.raises(ValueError, match="layer_map='1:5'"):
    distill.layer_pairs("1:5", 2, 4)


def _tiny(d_model, num_layers):
  return ModelConfig(vocab_size=11, d_model=d_model, num_layers=num_layers, num_heads=2)


def _build(cfg, seed):
  return jax.jit(lambda: build_model(cfg, seed=seed))()  # Op-by-op creation is slow on CPU.


def test_teacher_gets_no_gradient_and_projection_gets_one():
  teacher, student_cfg = _build(_tiny(16, 2), 1), _tiny(8, 1)
  d = distill.get_default_config()
  d.update(hidden_weight=1.0, layer_map="1:2")
  objective = distill.white_box_objective(d, teacher, student_cfg)
  graphdef, params = nnx.split(_build(student_cfg, 0))
  tokens = np.random.default_rng(0).integers(0, 11, size=(2, 6)).astype(np.int32)
  batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "weights": np.ones((2, 6))}

  @jax.jit
  def grads(proj, frozen):
    def loss(proj, frozen):
      out = objective.forward(nnx.merge(graphdef, params), batch["inputs"])
      return objective.loss(out, batch, proj, frozen)[0]

    return jax.grad(loss, argnums=(0, 1))(proj, frozen)

  proj_grads, teacher_grads = grads(objective.init_params(), objective.frozen)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(teacher_grads))
  assert np.any(np.asarray(proj_grads["kernel"]))  # Trained with the student (the loop test).


# ---------------------------------------------------------------------------------------------
# Through the training loop
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  def build(path):
    # Teacher and students read the same generated text (no dependence on ../shared/data), kept
    # beside the run: a run directory holds only what training writes.
    path.mkdir(parents=True)
    (path / "text.txt").write_text(pseudo_english(60_000))
    cfg = shakespeare_char.get_config("smoke")
    cfg.data.path = str(path / "text.txt")
    cfg.data.batch_size = 8  # Splits over the 8 test devices.
    cfg.report.measure_peak = False
    cfg.checkpoint.update(keep_best=False, async_save=False)
    train_and_evaluate(cfg, str(path / "run"))

  return shared_dir(tmp_path_factory, "distill_smoke_teacher", build) / "run"


def student(teacher_dir, **distill_settings):
  cfg = distill_configs.get_config("smoke")
  cfg.data.path = str(teacher_dir.parent / "text.txt")
  cfg.data.batch_size = 8
  cfg.report.measure_peak = False
  cfg.checkpoint.update(keep_best=False, async_save=False, every=0)
  cfg.distill.teacher_workdir = str(teacher_dir)
  cfg.distill.update(distill_settings)
  return cfg


def read_jsonl(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def final_state(workdir, cfg):
  from reslm.training.loop import abstract_state

  ckpt = Checkpointer(str(workdir), keep_best=False, async_save=False)
  meta = ckpt.read_meta()
  model_cfg = ModelConfig.from_config_dict(meta["model"])
  proj = meta["objective_params"]["kernel"]
  init = lambda: {"kernel": jnp.zeros(proj["shape"], proj["dtype"])}
  _, abstract, _ = abstract_state(model_cfg, cfg.train, init)
  state, _, step = ckpt.restore(abstract)
  ckpt.close()
  return state, step


def test_white_box_hidden_run_lowers_kl_and_resumes_exactly(teacher_dir, tmp_path):
  cfg = student(teacher_dir, hidden_weight=1.0, layer_map="1:2")
  cfg.train.update(steps=20, eval_every=1000)
  cfg.checkpoint.every = 10
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  reference = train_and_evaluate(cfg, str(straight))
  # An interrupted run: the same workdir as it was at step 10 (one train_and_evaluate fewer).
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "20")
  again = train_and_evaluate(cfg, str(resumed))
  assert again.step == reference.step == 20
  assert again.train_loss == reference.train_loss
  a, step_a = final_state(resumed, cfg)
  b, step_b = final_state(straight, cfg)
  assert step_a == step_b == 20
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert a.params[OBJECTIVE_PARAMS]["kernel"].shape == (1, 16, 32)  # Student 16 -> teacher 32.

  logs = [r for r in read_jsonl(straight) if "kl" in r]
  assert [r["step"] for r in logs] == [5, 10, 15, 20]
  assert logs[-1]["kl"] < 0.8 * logs[0]["kl"], logs
  assert logs[-1]["hidden_mse"] < logs[0]["hidden_mse"], logs
  # The student loads alone (the projection stays in the checkpoint) and gives the eval loss.
  _, model, _, _ = load_run(str(straight))
  assert model.cfg.d_model == 16 and OBJECTIVE_PARAMS not in nnx.to_pure_dict(nnx.state(model))
  report = json.loads((straight / "efficiency_report.json").read_text())
  n_student = sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert report["params"]["total"] == n_student


def test_black_box_corpus_is_the_teachers_deterministic_sample(teacher_dir, tmp_path):
  cfg = student(teacher_dir, mode="black_box")
  dataset = data_lib.build_dataset(cfg.data)
  model_cfg = model_config(cfg, dataset.vocab_size)
  objective, samples = distill.setup(cfg, model_cfg, dataset, str(tmp_path))
  assert objective is None  # Plain cross-entropy on the teacher's text.
  with np.load(tmp_path / distill.SAMPLES_FILE) as saved:
    tokens = saved["tokens"]
  b = cfg.distill.black_box
  assert tokens.shape == (b.num_sequences, min(cfg.data.seq_len + 1, 64))  # Teacher context.
  prompts = distill.corpus_prompts(cfg, None, b.num_sequences)
  np.testing.assert_array_equal(tokens[:, : b.prompt_len], prompts)
  _, teacher, _, _ = load_run(str(teacher_dir))
  kw = dict(length=tokens.shape[1], batch_size=b.batch_size)
  np.testing.assert_array_equal(distill.sample_corpus(teacher, prompts, seed=b.seed, **kw), tokens)
  other = distill.sample_corpus(teacher, prompts, seed=b.seed + 1, **kw)
  assert not np.array_equal(other, tokens)

  # Train batches: corpus rows shifted by one, scored only where the teacher wrote the target.
  batch = samples.train_batch(3)
  np.testing.assert_array_equal(batch["inputs"], samples.train_batch(3)["inputs"])
  n = tokens.shape[1] - 1
  rows = [np.flatnonzero((tokens[:, :n] == x[:n]).all(1))[0] for x in batch["inputs"]]
  np.testing.assert_array_equal(batch["targets"][:, :n], tokens[rows, 1:])
  expected = np.zeros(cfg.data.seq_len)
  expected[b.prompt_len - 1 : n] = 1
  np.testing.assert_array_equal(batch["weights"], np.broadcast_to(expected, batch["weights"].shape))
  assert samples.eval_batches(1)[0]["inputs"].shape == (8, cfg.data.seq_len)  # The real val text.


def test_bad_configs_fail_in_one_line_before_compile(teacher_dir, tmp_path):
  cases = [
    (dict(teacher_workdir=str(tmp_path / "none")), "holds no trained run"),
    (dict(mode="grey_box"), "distill.mode='grey_box' is not known"),
    (dict(temperature=0.0), "distill.temperature=0.0"),
    (dict(layer_map="1-2"), "distill.layer_map='1-2'"),
  ]
  for settings, message in cases:
    with pytest.raises(ValueError, match=message) as err:
      train_and_evaluate(student(teacher_dir, **settings), str(tmp_path / "run"))
    assert "\n" not in str(err.value)
  cfg = student(teacher_dir)
  vocab = len(
    set((teacher_dir.parent / "text.txt").read_text())
  )  # The char tokenizer's vocabulary.
  cfg.data.vocab_size = 80  # Pads the student's vocabulary past the teacher's.
  with pytest.raises(
    ValueError, match=f"teacher's vocab_size={vocab} differs from the student's 80"
  ):
    train_and_evaluate(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
  validate_experiment(distill_configs.get_config("hidden"))

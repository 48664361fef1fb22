"""Sampling rules and KV-cached generation.

`generate` must agree with a naive loop of full forward passes (greedy), top-k=1 and a tiny
nucleus must reduce to greedy, temperature-1 sampling must follow the softmax, top-k / top-p must
never leave their sets, a row that emits `eos_id` keeps emitting it, and an over-long request
fails before anything is compiled.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reslm.inference import generate, sample_logits
from reslm.inference import sampling as sampling_lib
from reslm.models import ModelConfig, build_model

VOCAB = 11
MAX_LEN = 24


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig(
    vocab_size=VOCAB,
    d_model=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    max_seq_len=MAX_LEN,
    init_std=0.5,  # Large init: peaked, varied logits.
  )
  return build_model(cfg, seed=1)


@pytest.fixture(scope="module")
def prompt():
  return jax.random.randint(jax.random.key(3), (3, 5), 0, VOCAB, jnp.int32)


def naive_greedy(model, prompt, new):
  """Greedy decoding by full forward passes over the whole sequence, no cache.

  The sequence buffer has a fixed length (one compile); the model is causal, so the filler after
  position i does not affect the logits read at i.
  """
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)
  b, p = prompt.shape
  seq = np.zeros((b, p + new), np.int32)
  seq[:, :p] = np.asarray(prompt)
  for i in range(p, p + new):
    logits = forward(state, jnp.asarray(seq))[:, i - 1]
    seq[:, i] = np.asarray(jnp.argmax(logits, -1))
  return seq


@pytest.fixture(scope="module")
def greedy(model, prompt):
  out = np.asarray(
    generate(model, prompt, max_new_tokens=8, rng=jax.random.key(0), temperature=0.0)
  )
  return out


def test_greedy_equals_naive_full_forward_loop(model, prompt, greedy):
  assert greedy.shape == (3, 13) and greedy.dtype == np.int32
  np.testing.assert_array_equal(greedy, naive_greedy(model, prompt, 8))
  assert len(np.unique(greedy[:, 5:])) > 1  # Not a degenerate constant continuation.


def test_top_k_one_equals_greedy(model, prompt, greedy):
  out = generate(model, prompt, max_new_tokens=8, rng=jax.random.key(5), temperature=1.0, top_k=1)
  np.testing.assert_array_equal(np.asarray(out), greedy)


def test_tiny_top_p_equals_greedy(model, prompt, greedy):
  out = generate(
    model, prompt, max_new_tokens=8, rng=jax.random.key(6), temperature=1.5, top_p=1e-6
  )
  np.testing.assert_array_equal(np.asarray(out), greedy)


def test_single_new_token(model, prompt, greedy):
  out = generate(model, prompt, max_new_tokens=1, rng=jax.random.key(0), temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out), greedy[:, :6])


def _draws(logits, n, seed=0, **kw):
  rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  return np.asarray(sample_logits(rows, jax.random.key(seed), **kw))


def _chi_square(counts, probs):
  expected = np.asarray(probs) * counts.sum()
  return float(((counts - expected) ** 2 / expected).sum())


# Upper 1e-4 tail of the chi-square distribution with 4 and 1 degrees of freedom.
CHI2_4DF = 23.5
CHI2_1DF = 15.1


def test_temperature_one_matches_softmax_frequencies():
  logits = np.array([1.0, 0.0, -0.5, 2.0, 0.3])
  probs = np.exp(logits) / np.exp(logits).sum()
  draws = _draws(logits, 20000, temperature=1.0)
  counts = np.bincount(draws, minlength=5)
  assert _chi_square(counts, probs) < CHI2_4DF, (counts, probs)


def test_temperature_scales_logits():
  logits = np.array([1.0, 0.0, -0.5, 2.0, 0.3])
  probs = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum()
  counts = np.bincount(_draws(logits, 20000, seed=1, temperature=2.0), minlength=5)
  assert _chi_square(counts, probs) < CHI2_4DF, (counts, probs)


def test_temperature_zero_is_argmax():
  logits = jax.random.normal(jax.random.key(0), (16, 7))
  out = sample_logits(logits, jax.random.key(1), temperature=0.0, top_k=3, top_p=0.5)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.argmax(logits, -1)))


def test_top_k_two_stays_in_top_two():
  logits = np.array([0.5, 2.0, -1.0, 1.5, 0.0, 1.0])  # Top two: ids 1 and 3.
  draws = _draws(logits, 5000, seed=2, temperature=1.0, top_k=2)
  assert set(np.unique(draws)) == {1, 3}
  p1 = np.exp(2.0) / (np.exp(2.0) + np.exp(1.5))
  counts = np.array([(draws == 1).sum(), (draws == 3).sum()])
  assert _chi_square(counts, [p1, 1 - p1]) < CHI2_1DF


def test_top_p_keeps_smallest_set_reaching_mass():
  probs = np.array([0.5, 0.3, 0.2])
  draws = _draws(np.log(probs), 5000, seed=3, temperature=1.0, top_p=0.6)
  assert set(np.unique(draws)) == {0, 1}
  counts = np.array([(draws == 0).sum(), (draws == 1).sum()])
  assert _chi_square(counts, [0.5 / 0.8, 0.3 / 0.8]) < CHI2_1DF


def test_top_p_is_per_row():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]))
  rows = jnp.repeat(logits, 2000, axis=0)  # Alternating blocks: first 2000 rows, then 2000.
  draws = np.asarray(sample_logits(rows, jax.random.key(4), top_p=0.6))
  assert set(np.unique(draws[:2000])) == {0, 1}
  assert set(np.unique(draws[2000:])) == {1, 2}


def test_eos_row_keeps_emitting_eos(model, prompt):
  kw = dict(max_new_tokens=16, rng=jax.random.key(11), temperature=1.0)
  free = np.asarray(generate(model, prompt, **kw))[:, 5:]
  eos = int(free[0, 2])  # A token some row emits mid-sequence when unconstrained.
  out = np.asarray(generate(model, prompt, eos_id=eos, **kw))
  np.testing.assert_array_equal(out[:, :5], np.asarray(prompt))
  new = out[:, 5:]
  stopped = 0
  for row in range(new.shape[0]):
    hits = np.flatnonzero(free[row] == eos)
    if hits.size == 0:
      np.testing.assert_array_equal(new[row], free[row])
      continue
    first = hits[0]
    # Same draws up to and including the first eos, then only eos.
    np.testing.assert_array_equal(new[row, : first + 1], free[row, : first + 1])
    assert (new[row, first:] == eos).all(), new[row]
    stopped += first < new.shape[1] - 1
  assert stopped >= 1
  assert not (free[0, 3:] == eos).all()  # Without eos_id the row would have continued.


def test_too_long_request_raises_before_compiling(model, prompt, monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("the generation program was reached")

  monkeypatch.setattr(sampling_lib, "_generate", fail)
  with pytest.raises(ValueError, match="max_seq_len=24"):
    generate(model, prompt, max_new_tokens=MAX_LEN - 4, rng=jax.random.key(0))
  # Exactly max_seq_len is allowed (and would reach the program).
  with pytest.raises(AssertionError, match="reached"):
    generate(model, prompt, max_new_tokens=MAX_LEN - 5, rng=jax.random.key(0))


@pytest.mark.parametrize(
  "kw", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)]
)
def test_bad_sampling_arguments_raise(kw):
  with pytest.raises(ValueError, match="sampling needs"):
    sample_logits(jnp.zeros((1, 3)), jax.random.key(0), **kw)


@pytest.mark.parametrize(
  ("kw", "names"),
  [
    (dict(mixer="lsh"), ["model.mixer=lsh"]),
    (dict(mlp="moe", mlp_options={"dispatch": "capacity"}), ["model.mlp=moe"]),
    (dict(mixer="lsh", mlp="moe", mlp_options={"dispatch": "capacity"}), ["lsh", "moe"]),
    (dict(), []),
    (dict(mixer="rwkv", mlp="rwkv_cmix"), []),
    (dict(mlp="moe"), []),  # dropless, the decoder default
  ],
)
def test_generate_warns_one_line_per_inexact_layer(kw, names, caplog, monkeypatch):
  """LSH's dense decoding fallback and MoE capacity drops are named, one line each, with the
  reason; exact layers (attention, RWKV with its channel-mix, dropless MoE) stay silent."""
  monkeypatch.setattr(sampling_lib, "_generate", lambda *a, **k: None)  # Nothing to compile.
  cfg = ModelConfig(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, max_seq_len=16, **kw)
  model = nnx.eval_shape(lambda: build_model(cfg))
  with caplog.at_level(logging.WARNING, logger=sampling_lib.__name__):
    generate(model, np.ones((1, 3), np.int32), max_new_tokens=2, rng=jax.random.key(0))
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == len(names)
  for line, name in zip(lines, names, strict=True):
    assert name in line and "cached decoding differs from the full forward" in line
    assert "\n" not in line


def test_generate_refuses_a_model_that_cannot_decode():
  cfg = ModelConfig(vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=2, kind="encoder")
  encoder = nnx.eval_shape(lambda: build_model(cfg))
  with pytest.raises(ValueError, match="generation needs a decoder LM") as e:
    generate(encoder, np.ones((1, 3), np.int32), max_new_tokens=2, rng=jax.random.key(0))
  assert "\n" not in str(e.value)

"""Synthetic tasks checked against their definitions, re-derived from the generated tokens."""

import numpy as np
import pytest

from reslm.data import synthetic
from reslm.data.synthetic import LISTOPS_IDS, LISTOPS_VOCAB

_KEYS = ("inputs", "targets", "weights")


def _check_layout(batch, b, seq_len, hidden_answers=False):
  assert set(batch) == {"inputs", "targets", "weights"}
  for key, dtype in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32)):
    assert batch[key].shape == (b, seq_len) and batch[key].dtype == dtype
  # Next-token layout: both views of one sequence (MQAR hides the answers after its queries).
  shifted = batch["targets"][:, :-1] == batch["inputs"][:, 1:]
  if hidden_answers:
    shifted |= batch["weights"][:, :-1] > 0
  assert shifted.all()


@pytest.mark.parametrize(
  ("seq_len", "vocab_size", "n"), [(64, 100, 8), (63, 33, 16), (256, 8192, 1)]
)
def test_mqar_answers_are_the_bound_values(seq_len, vocab_size, n):
  batch = synthetic.mqar(np.random.default_rng(0), 16, seq_len, vocab_size, n)
  _check_layout(batch, 16, seq_len, hidden_answers=True)
  key_range, value_range = synthetic.mqar_vocab_split(vocab_size)
  for inputs, targets, weights in zip(*(batch[k] for k in _KEYS), strict=True):
    keys, values = inputs[0 : 2 * n : 2], inputs[1 : 2 * n : 2]
    assert len(set(keys.tolist())) == n  # keys distinct
    assert all(k in key_range for k in keys) and all(v in value_range for v in values)
    binding = dict(zip(keys.tolist(), values.tolist(), strict=True))
    scored = np.flatnonzero(weights)
    assert set(np.unique(weights)) <= {0.0, 1.0}
    assert sorted(inputs[scored].tolist()) == sorted(keys.tolist())  # each key queried once
    assert scored.min() >= 2 * n  # queries come after the bindings
    for t in scored:
      assert targets[t] == binding[int(inputs[t])]
    # Answers are never shown: the input after a query is filler, so no elimination shortcut.
    after = scored + 1
    assert not inputs[after[after < len(inputs)]].any()
    # Outside the scored queries and their answers, the query region is filler.
    region = inputs[2 * n :].copy()
    region[scored - 2 * n] = 0
    answers = scored + 1 - 2 * n
    region[answers[answers < len(region)]] = 0
    assert not region.any()


def test_mqar_validation():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=r"num_kv_pairs=9 needs data.seq_len >= 35"):
    synthetic.mqar(rng, 2, 34, 100, 9)
  with pytest.raises(ValueError, match=r"data.vocab_size=16 is too small.*need at least 19"):
    synthetic.mqar(rng, 2, 64, 16, 9)
  with pytest.raises(ValueError, match="must be >= 1"):
    synthetic.mqar(rng, 2, 64, 100, 0)


@pytest.mark.parametrize("seq_len", [32, 33])
def test_copy_second_half_repeats_first(seq_len):
  batch = synthetic.copy_task(np.random.default_rng(1), 8, seq_len, 10)
  _check_layout(batch, 8, seq_len)
  m = seq_len // 2
  inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
  assert (weights.sum(axis=1) == m).all()
  np.testing.assert_array_equal(np.flatnonzero(weights[0]), np.arange(m, 2 * m))
  np.testing.assert_array_equal(targets[:, m : 2 * m], inputs[:, :m])
  assert (inputs[:, m] == synthetic.COPY_SEPARATOR_ID).all()
  assert (inputs[:, :m] >= 2).all() and (inputs[:, :m] < 10).all()


@pytest.mark.parametrize(
  ("expr", "answer"),
  [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 4 7 ]", 4),
    ("[MED 7 1 4 ]", 4),
    ("[MED 1 2 3 4 ]", 2),  # floor of the mean of the middle pair
    ("[MED 3 8 ]", 5),
    ("[SM 5 6 7 ]", 8),
    ("[MIN [MAX 1 3 ] [SM 9 9 ] 5 ]", 3),
    ("[SM [MED 9 9 0 ] [MAX 0 1 ] ]", 0),
    ("7", 7),
  ],
)
def test_listops_evaluator_hand_built(expr, answer):
  assert synthetic.evaluate_listops(expr) == answer


@pytest.mark.parametrize("expr", ["[MAX 1 2", "[MAX 1 2 ] 3", "[FOO 1 2 ]", "[MIN ]", "12"])
def test_listops_evaluator_rejects_malformed(expr):
  with pytest.raises(ValueError):
    synthetic.evaluate_listops(expr)


def _max_depth_and_args(tokens):
  depth = max_depth = 0
  arg_counts, stack = [], []
  for tok in tokens:
    if tok == "[":
      depth += 1
      max_depth = max(max_depth, depth)
      if stack:
        stack[-1] += 1
      stack.append(-1)  # the operator token is counted next and is not an argument
    elif tok == "]":
      arg_counts.append(stack.pop())
      depth -= 1
    elif stack:
      stack[-1] += 1
  return max_depth, max(arg_counts)


@pytest.mark.parametrize(("seq_len", "max_depth", "max_args"), [(128, 4, 5), (6, 3, 4), (20, 6, 3)])
def test_listops_answers_match_evaluator(seq_len, max_depth, max_args):
  batch = synthetic.listops(np.random.default_rng(2), 16, seq_len, max_depth, max_args)
  _check_layout(batch, 16, seq_len)
  eq, pad = LISTOPS_IDS["="], LISTOPS_IDS["<pad>"]
  for inputs, targets, weights in zip(*(batch[k] for k in _KEYS), strict=True):
    scored = np.flatnonzero(weights)
    assert len(scored) == 1 and weights.sum() == 1
    t = scored[0]
    assert inputs[t] == eq and (inputs[:t] != eq).all()
    tokens = [LISTOPS_VOCAB[i] for i in inputs[:t]]
    assert LISTOPS_VOCAB[targets[t]] == str(synthetic.evaluate_listops(tokens))
    assert (targets[t + 1 :] == pad).all()
    depth, args = _max_depth_and_args(tokens)
    assert 1 <= depth <= max_depth and 2 <= args <= max_args


def test_listops_validation():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=r"data.seq_len=5 is too short for listops"):
    synthetic.listops(rng, 1, 5)
  with pytest.raises(ValueError, match=r"data.listops.max_args=1"):
    synthetic.listops(rng, 1, 32, max_args=1)


@pytest.mark.parametrize("name", sorted(synthetic.TASKS))
def test_tasks_are_deterministic_given_the_generator(name):
  task = synthetic.get_task(name)
  vocab = task.resolve_vocab_size(0)
  a = task.generate(np.random.default_rng(5), 4, 64, vocab)
  b = task.generate(np.random.default_rng(5), 4, 64, vocab)
  c = task.generate(np.random.default_rng(6), 4, 64, vocab)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["inputs"], c["inputs"])
  assert a["inputs"].max() < vocab


def test_task_registry_errors():
  with pytest.raises(ValueError, match=r"data.source='xyz'.*choose one of: mqar, copy, listops"):
    synthetic.get_task("xyz")
  with pytest.raises(ValueError, match=r"data.vocab_size=100 but listops has a fixed vocabulary"):
    synthetic.get_task("listops").resolve_vocab_size(100)
  assert synthetic.get_task("listops").resolve_vocab_size(0) == len(LISTOPS_VOCAB)
  assert synthetic.get_task("mqar").resolve_vocab_size(64) == 64

"""Config validation, determinism, multi-host slicing and masked-LM corruption."""

import numpy as np
import pytest

from reslm.data import build_dataset, get_default_config, validate_config


def _cfg(**overrides):
  cfg = get_default_config()
  cfg.update(overrides)
  return cfg


def _text_cfg(path, **overrides):
  return _cfg(**{"source": "text", "path": str(path), "seq_len": 32, "batch_size": 8, **overrides})


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_default_config_is_valid():
  validate_config(get_default_config())


@pytest.mark.parametrize(
  ("overrides", "match"),
  [
    (
      {"source": "xyz"},
      r"^data\.source='xyz' is not a known source; choose one of: mqar, copy, "
      r"listops, text$",
    ),
    (
      {"tokenizer": "xyz"},
      r"^data\.tokenizer='xyz' is not a known tokenizer; choose one of: "
      r"byte, char, sentencepiece, hf$",
    ),
    ({"objective": "prefix"}, r"data\.objective='prefix'.*choose one of: causal, mlm"),
    ({"seq_len": 0}, r"data\.seq_len=0 must be a positive integer"),
    ({"batch_size": -4}, r"data\.batch_size=-4 must be a positive integer"),
    ({"eval_batch_size": -1}, r"data\.eval_batch_size=-1 must be an integer >= 0"),
    ({"train_fraction": 1.0}, r"data\.train_fraction=1\.0 must be in \(0, 1\)"),
    ({"train_fraction": 0.0}, r"data\.train_fraction=0\.0 must be in \(0, 1\)"),
    ({"mask_prob": 1.5}, r"data\.mask_prob=1\.5 must be in \(0, 1\)"),
    ({"source": "text"}, r"data\.path='' is empty"),
    (
      {"source": "text", "path": "x.txt", "tokenizer": "char", "objective": "mlm"},
      r"data\.objective='mlm' needs a mask token.*data\.char_add_specials=True",
    ),
    (
      {
        "source": "text",
        "path": "x.txt",
        "tokenizer": "sentencepiece",
        "sentencepiece_model_type": "wordpiece",
      },
      r"sentencepiece_model_type='wordpiece'",
    ),
    ({"seq_len": 30}, r"data\.mqar\.num_kv_pairs=8 needs data\.seq_len >= 31"),
    ({"source": "listops", "vocab_size": 64}, r"data\.vocab_size=64 but listops has a fixed"),
  ],
)
def test_validate_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    validate_config(_cfg(**overrides))


def test_batch_must_divide_over_processes():
  with pytest.raises(
    ValueError, match=r"data\.batch_size=6 must be divisible by the process count \(4\)"
  ):
    build_dataset(_cfg(batch_size=6), process_count=4)
  with pytest.raises(ValueError, match=r"data\.eval_batch_size=3 must be divisible"):
    build_dataset(_cfg(batch_size=4, eval_batch_size=3), process_count=2)
  with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
    build_dataset(_cfg(), process_index=2, process_count=2)


def _sources(text_path):
  return [
    _cfg(source="mqar", seq_len=64, batch_size=8),
    _cfg(source="copy", seq_len=64, batch_size=8),
    _cfg(source="listops", seq_len=64, batch_size=8),
    _text_cfg(text_path),
    _text_cfg(text_path, tokenizer="char"),
  ]


@pytest.mark.parametrize("objective", ["causal", "mlm"])
def test_batches_are_pure_functions_of_seed_and_step(corpus_file, objective):
  for cfg in _sources(corpus_file):
    if cfg.tokenizer == "char":
      cfg.char_add_specials = True
    cfg.objective = objective
    ds, again = build_dataset(cfg), build_dataset(cfg)
    b5 = ds.train_batch(5)
    ds.train_batch(6)  # iteration history must not matter
    _assert_batches_equal(b5, again.train_batch(5))
    _assert_batches_equal(b5, ds.train_batch(5))
    assert not np.array_equal(b5["inputs"], ds.train_batch(6)["inputs"])
    other_seed = cfg.copy_and_resolve_references()
    other_seed.seed = 1
    assert not np.array_equal(b5["inputs"], build_dataset(other_seed).train_batch(5)["inputs"])
    evals = ds.eval_batches(3)
    assert len(evals) == 3
    for a, b in zip(evals, again.eval_batches(3), strict=True):
      _assert_batches_equal(a, b)
    assert not np.array_equal(evals[0]["inputs"], evals[1]["inputs"])
    assert not np.array_equal(evals[0]["inputs"], ds.train_batch(0)["inputs"])
    for batch in (b5, *evals):
      assert batch["inputs"].shape == (8, cfg.seq_len) and batch["inputs"].dtype == np.int32
      assert batch["weights"].dtype == np.float32
      assert batch["inputs"].max() < ds.vocab_size and batch["targets"].max() < ds.vocab_size


@pytest.mark.parametrize("objective", ["causal", "mlm"])
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_rows_concatenate_to_the_global_batch(corpus_file, objective, process_count):
  for cfg in _sources(corpus_file):
    cfg.char_add_specials = True
    cfg.objective = objective
    whole = build_dataset(cfg)
    parts = [
      build_dataset(cfg, process_index=i, process_count=process_count) for i in range(process_count)
    ]
    assert all(p.rows_per_process == 8 // process_count for p in parts)
    for step in (0, 7):
      joined = {
        k: np.concatenate([p.train_batch(step)[k] for p in parts])
        for k in ("inputs", "targets", "weights")
      }
      _assert_batches_equal(joined, whole.train_batch(step))
    joined = {
      k: np.concatenate([p.eval_batches(1)[0][k] for p in parts])
      for k in ("inputs", "targets", "weights")
    }
    _assert_batches_equal(joined, whole.eval_batches(1)[0])


@pytest.mark.parametrize("source", ["mqar", "copy", "listops"])
def test_synthetic_mlm_reserves_a_mask_token(source):
  causal = build_dataset(_cfg(source=source, seq_len=64, batch_size=8))
  mlm = build_dataset(_cfg(source=source, seq_len=64, batch_size=8, objective="mlm"))
  assert causal.mask_id is None and causal.tokenizer is None and causal.bytes_per_token is None
  assert mlm.mask_id == causal.vocab_size and mlm.vocab_size == causal.vocab_size + 1
  batch = mlm.train_batch(0)
  # Targets are the clean (unshifted) tokens: the causal batch's inputs at the same step.
  np.testing.assert_array_equal(batch["targets"], causal.train_batch(0)["inputs"])
  unscored = batch["weights"] == 0
  np.testing.assert_array_equal(batch["inputs"][unscored], batch["targets"][unscored])
  assert (batch["targets"][batch["weights"] == 1] != mlm.pad_id).all()  # filler never scored


def test_mlm_masks_at_the_configured_rate(corpus_file):
  p = 0.15
  ds = build_dataset(
    _text_cfg(corpus_file, objective="mlm", batch_size=64, seq_len=128, mask_prob=p)
  )
  batch = ds.train_batch(0)
  inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
  chosen = weights == 1
  assert set(np.unique(weights)) == {0.0, 1.0}
  np.testing.assert_array_equal(inputs[~chosen], targets[~chosen])
  n = weights.size
  # 5 standard deviations of a Binomial(n, p) fraction.
  assert abs(chosen.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
  k = chosen.sum()
  masked = (inputs[chosen] == ds.mask_id).mean()
  kept = (inputs[chosen] == targets[chosen]).mean()
  assert abs(masked - 0.8) < 5 * np.sqrt(0.8 * 0.2 / k)
  assert abs(kept - 0.1) < 5 * np.sqrt(0.1 * 0.9 / k) + 1 / 256  # + chance a random id matches
  assert ds.mask_id not in targets

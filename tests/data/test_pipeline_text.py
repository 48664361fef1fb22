"""The text source: windows, the train/val split, bytes per token, and its errors."""

from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from reslm.data import build_dataset, get_default_config, tokenizers

TINYSHAKESPEARE = Path(__file__).parents[2] / ".." / "shared" / "data" / "tinyshakespeare.txt"


def _text_cfg(path, **overrides):
  cfg = get_default_config()
  cfg.update({"source": "text", "path": str(path), "seq_len": 32, "batch_size": 8, **overrides})
  return cfg


def _contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
  return bool((sliding_window_view(haystack, len(needle)) == needle).all(axis=1).any())


_TOKENIZER_SETTINGS = {
  "byte": {},
  "char": {},
  "sentencepiece": {"sentencepiece_vocab_size": 400},
}


@pytest.mark.parametrize("tokenizer", sorted(_TOKENIZER_SETTINGS))
def test_windows_are_substrings_of_their_split(corpus_file, corpus, tokenizer):
  cfg = _text_cfg(corpus_file, tokenizer=tokenizer, **_TOKENIZER_SETTINGS[tokenizer])
  ds = build_dataset(cfg)
  # The tokenizer built from the same text gives the same ids, so the split can be re-derived.
  ids = ds.tokenizer.encode(corpus)
  assert ds.tokenizer.decode(ids) == corpus
  n_train = int(len(ids) * cfg.train_fraction)
  train, val = ids[:n_train], ids[n_train:]
  for split, batches in (
    ("train", [ds.train_batch(s) for s in range(3)]),
    ("val", ds.eval_batches(3)),
  ):
    tokens = train if split == "train" else val
    for batch in batches:
      inputs, targets = batch["inputs"], batch["targets"]
      np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
      assert (batch["weights"] == 1).all()
      for row_in, row_tg in zip(inputs, targets, strict=True):
        assert _contains(tokens, np.append(row_in, row_tg[-1])), split


def test_split_boundary_is_respected(tmp_path):
  # Byte tokens = chars here: the first 900 are only "a"/"b", the last 100 only "x"/"y".
  rng = np.random.default_rng(0)
  text = "".join(rng.choice(list("ab"), 900)) + "".join(rng.choice(list("xy"), 100))
  path = tmp_path / "split.txt"
  path.write_text(text)
  ds = build_dataset(_text_cfg(path, seq_len=16, train_fraction=0.9))
  train = np.concatenate([ds.train_batch(s)["targets"] for s in range(20)])
  val = np.concatenate([b["targets"] for b in ds.eval_batches(20)])
  assert set(np.unique(train).tolist()) == {ord("a"), ord("b")}
  assert set(np.unique(val).tolist()) == {ord("x"), ord("y")}


def test_vocab_and_bytes_per_token(corpus_file, corpus):
  byte = build_dataset(_text_cfg(corpus_file))
  assert byte.vocab_size == 260 and byte.bytes_per_token == 1.0 and byte.pad_id == 256
  char = build_dataset(_text_cfg(corpus_file, tokenizer="char"))
  assert char.vocab_size == len(set(corpus)) and char.mask_id is None
  ids = char.tokenizer.encode(corpus)
  val_text = corpus[int(len(ids) * 0.9) :]  # one char per token
  assert char.bytes_per_token == pytest.approx(len(val_text.encode("utf-8")) / len(val_text))
  assert char.bytes_per_token > 1.0  # the corpus has multi-byte characters
  sp = build_dataset(
    _text_cfg(corpus_file, tokenizer="sentencepiece", sentencepiece_vocab_size=400)
  )
  assert sp.bytes_per_token > char.bytes_per_token  # pieces merge several characters
  padded = build_dataset(_text_cfg(corpus_file, tokenizer="char", vocab_size=128))
  assert padded.vocab_size == 128
  assert "char tokenizer" in char.describe() and "val tokens" in char.describe()


@pytest.mark.parametrize("tokenizer", ["byte", "char", "sentencepiece"])
def test_text_mlm_uses_the_tokenizer_mask(corpus_file, tokenizer):
  cfg = _text_cfg(
    corpus_file,
    tokenizer=tokenizer,
    objective="mlm",
    char_add_specials=True,
    sentencepiece_vocab_size=400,
  )
  ds = build_dataset(cfg)
  assert ds.mask_id == ds.tokenizer.mask_id is not None
  batch = ds.train_batch(0)
  unscored = batch["weights"] == 0
  np.testing.assert_array_equal(batch["inputs"][unscored], batch["targets"][unscored])
  assert (batch["inputs"] == ds.mask_id).any()
  cfg.objective = "causal"
  np.testing.assert_array_equal(batch["targets"], build_dataset(cfg).train_batch(0)["inputs"])


def test_text_errors(tmp_path, corpus_file):
  with pytest.raises(ValueError, match=r"^data\.path='.*missing\.txt' does not exist$"):
    build_dataset(_text_cfg(tmp_path / "missing.txt"))
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(ValueError, match=r"^data\.path='.*empty\.txt' is empty"):
    build_dataset(_text_cfg(empty))
  short = tmp_path / "short.txt"
  short.write_text("x" * 200)  # 180 train / 20 val bytes
  with pytest.raises(ValueError, match=r"gives 20 val tokens .*fewer than data\.seq_len \+ 1 = 33"):
    build_dataset(_text_cfg(short))
  with pytest.raises(ValueError, match=r"gives 180 train tokens .*= 257"):
    build_dataset(_text_cfg(short, seq_len=256))
  with pytest.raises(
    ValueError, match=r"data\.vocab_size=100 is smaller than the byte tokenizer's 260"
  ):
    build_dataset(_text_cfg(corpus_file, vocab_size=100))
  with pytest.raises(ValueError, match=r"data\.text_field='body'.*available columns: text"):
    build_dataset(_text_cfg(corpus_file, text_field="body"))


def test_tokenizer_from_a_built_dataset_round_trips_through_dict(corpus_file, corpus):
  ds = build_dataset(_text_cfg(corpus_file, tokenizer="char"))
  restored = tokenizers.tokenizer_from_dict(ds.tokenizer.to_dict())
  np.testing.assert_array_equal(restored.encode(corpus), ds.tokenizer.encode(corpus))


@pytest.mark.skipif(
  not TINYSHAKESPEARE.exists(), reason=f"tinyshakespeare not found at {TINYSHAKESPEARE}"
)
def test_tinyshakespeare_char_vocab_is_65():
  ds = build_dataset(_text_cfg(TINYSHAKESPEARE, tokenizer="char", seq_len=256))
  assert ds.vocab_size == 65
  # nanoGPT's shakespeare_char split of 1,115,394 characters.
  assert "1,003,854 train / 111,540 val tokens" in ds.describe()

"""Tokenizer round trips, vocabularies, serialisation and errors."""

import json

import numpy as np
import pytest

from reslm.data import tokenizers
from reslm.data.tokenizers import ByteTokenizer, CharTokenizer, SentencePieceTokenizer

UNICODE = "héllo wörld — 日本語 🙂\n\ttabs  and  spaces\n"


def test_byte_round_trip_and_ids():
  tok = ByteTokenizer()
  ids = tok.encode(UNICODE)
  assert ids.dtype == np.int32
  assert ids.tolist() == list(UNICODE.encode("utf-8"))
  assert tok.decode(ids) == UNICODE
  assert tok.vocab_size == 260
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (256, 257, 258, 259)


def test_byte_decode_drops_specials_and_replaces_invalid_utf8():
  tok = ByteTokenizer()
  ids = [tok.bos_id, *tok.encode("ab"), tok.mask_id, tok.pad_id, tok.eos_id]
  assert tok.decode(ids) == "ab"
  assert tok.decode([0xFF, ord("a")]) == "\ufffda"


def test_char_vocab_is_sorted_unique_chars(corpus):
  tok = CharTokenizer.from_text(corpus)
  assert list(tok.chars) == sorted(set(corpus))
  assert tok.vocab_size == len(set(corpus))
  assert tok.mask_id is None and tok.pad_id is None
  ids = tok.encode(corpus)
  assert ids.dtype == np.int32
  assert [tok.chars[i] for i in ids[:50]] == list(corpus[:50])
  assert tok.decode(ids) == corpus


def test_char_specials_follow_the_chars(corpus):
  plain = CharTokenizer.from_text(corpus)
  tok = CharTokenizer.from_text(corpus, add_specials=True)
  n = len(set(corpus))
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (n, n + 1, n + 2, n + 3)
  assert tok.vocab_size == n + 4
  np.testing.assert_array_equal(tok.encode(corpus), plain.encode(corpus))
  assert tok.decode([tok.bos_id, *tok.encode("ka"), tok.mask_id, tok.eos_id]) == "ka"


def test_char_unknown_character_is_named():
  tok = CharTokenizer.from_text("abc")
  with pytest.raises(ValueError, match=r"character 'Z' \(at index 2\)"):
    tok.encode("abZcY")


@pytest.mark.parametrize("add_specials", [False, True])
def test_char_serialises_through_json(corpus, add_specials):
  tok = CharTokenizer.from_text(corpus, add_specials=add_specials)
  restored = tokenizers.tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
  assert isinstance(restored, CharTokenizer)
  assert restored.chars == tok.chars
  assert restored.vocab_size == tok.vocab_size and restored.mask_id == tok.mask_id
  np.testing.assert_array_equal(restored.encode(corpus), tok.encode(corpus))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_round_trip(corpus, model_type):
  tok = SentencePieceTokenizer.train(corpus, vocab_size=400, model_type=model_type)
  ids = tok.encode(corpus)
  assert ids.dtype == np.int32
  assert len(ids) < len(corpus)  # merges happened
  assert tok.decode(ids) == corpus
  # Characters never seen in training survive through byte fallback.
  assert tok.decode(tok.encode(UNICODE)) == UNICODE
  assert ids.max() < tok.vocab_size <= 400


def test_sentencepiece_specials_and_json(corpus):
  tok = SentencePieceTokenizer.train(corpus, vocab_size=400)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert tok.mask_id is not None and tok.mask_id not in (tok.pad_id, tok.bos_id, tok.eos_id)
  assert tok.decode([tok.bos_id, *tok.encode("ka ne"), tok.eos_id, tok.pad_id]) == "ka ne"
  restored = tokenizers.tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
  assert isinstance(restored, SentencePieceTokenizer)
  assert restored.model_proto == tok.model_proto
  np.testing.assert_array_equal(restored.encode(corpus), tok.encode(corpus))


def test_sentencepiece_errors(corpus):
  with pytest.raises(ValueError, match=r"data\.sentencepiece_vocab_size=50 could not be trained"):
    SentencePieceTokenizer.train(corpus, vocab_size=50)
  with pytest.raises(ValueError, match="model_type='wordpiece'.*choose one of: bpe, unigram"):
    SentencePieceTokenizer.train(corpus, vocab_size=400, model_type="wordpiece")


def test_build_tokenizer_registry(corpus):
  assert isinstance(tokenizers.build_tokenizer("byte"), ByteTokenizer)
  char = tokenizers.build_tokenizer("char", text=corpus, add_specials=True)
  assert isinstance(char, CharTokenizer) and char.mask_id is not None
  sp = tokenizers.build_tokenizer("sentencepiece", text=corpus, vocab_size=400)
  assert isinstance(sp, SentencePieceTokenizer)
  for tok in (char, sp, ByteTokenizer()):
    assert isinstance(tok, tokenizers.Tokenizer)


def test_build_tokenizer_errors():
  msg = (
    "data.tokenizer='xyz' is not a known tokenizer; choose one of: byte, char, sentencepiece, hf"
  )
  with pytest.raises(ValueError) as err:
    tokenizers.build_tokenizer("xyz")
  assert str(err.value) == msg
  with pytest.raises(ValueError, match="choose one of: byte, char, sentencepiece, hf"):
    tokenizers.tokenizer_from_dict({"name": "xyz"})
  with pytest.raises(ValueError, match=r"data\.tokenizer='char' is built from a text"):
    tokenizers.build_tokenizer("char")

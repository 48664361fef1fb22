"""`data.tokenizer="hf"`: a checkpoint's tokenizer.json encodes and decodes exactly as the
`tokenizers` library does (BOS templates, byte-level BPE, WordPiece with [CLS]/[SEP]), with the
checkpoint's special tokens, and drives the text pipeline."""

import json
import pathlib
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

from reslm.data import build_dataset, get_default_config
from reslm.data.hf_tokenizer import HFTokenizer
from reslm.data.tokenizers import build_tokenizer, tokenizer_from_dict

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
TEXT = "Life, Liberty and the pursuit of Happiness; 1776: the Laws of Nature's God!"
# (fixture, tokenizer style, special ids by kind, whether encode adds a leading special token)
STYLES = [
  ("llama_gqa_untied", "BPE, byte fallback, <s> template", {"bos": 1, "eos": 2, "unk": 0}, True),
  ("gpt2", "byte-level BPE", {"bos": 0, "eos": 0}, False),
  (
    "bert_pretraining",
    "WordPiece, [CLS] ... [SEP]",
    {"bos": 2, "eos": 3, "pad": 0, "mask": 4},
    True,
  ),
]


@pytest.mark.parametrize(("name", "style", "special", "leading"), STYLES)
def test_encodes_and_decodes_like_tokenizers(name, style, special, leading):
  del style
  ref = Tokenizer.from_file(str(FIXTURES / name / "tokenizer.json"))
  tok = build_tokenizer("hf", path=str(FIXTURES / name))
  ids = tok.encode(TEXT)
  assert ids.dtype == np.int32
  assert ids.tolist() == ref.encode(TEXT).ids
  assert tok.decode(ids) == ref.decode(ref.encode(TEXT).ids, skip_special_tokens=True)
  for kind, value in special.items():
    assert tok.special[kind] == value, kind
  assert (ids[0] == tok.bos_id) == leading  # The checkpoint's template decides.
  again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
  assert again.encode(TEXT).tolist() == ids.tolist() and again.special == tok.special


def test_tokenizer_config_special_tokens_win(tmp_path):
  shutil.copy(FIXTURES / "gpt2" / "tokenizer.json", tmp_path / "tokenizer.json")
  vocab = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab()
  pad = next(t for t in sorted(vocab) if vocab[t] == 5)
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"pad_token": {"content": pad}, "eos_token": "<|endoftext|>"})
  )
  tok = HFTokenizer.from_path(str(tmp_path))
  assert tok.pad_id == 5 and tok.eos_id == vocab["<|endoftext|>"]


def test_text_pipeline_with_the_checkpoint_tokenizer(tmp_path):
  path = tmp_path / "text.txt"
  path.write_text((TEXT + "\n") * 40, encoding="utf-8")
  cfg = get_default_config()
  cfg.update(
    source="text", path=str(path), tokenizer="hf", tokenizer_path=str(FIXTURES / "bert_pretraining"),
    objective="mlm", seq_len=16, batch_size=2,
  )  # fmt: skip
  ds = build_dataset(cfg)
  ref = Tokenizer.from_file(str(FIXTURES / "bert_pretraining" / "tokenizer.json"))
  assert ds.vocab_size == 128 and ds.mask_id == 4 and ds.pad_id == 0
  batch = ds.train_batch(0)
  assert batch["inputs"].shape == (2, 16) and int(batch["weights"].sum()) > 0
  corpus = ref.encode(path.read_text()).ids
  assert ds.tokenizer.encode(path.read_text()).tolist() == corpus


def test_missing_tokenizer_path_is_one_line(tmp_path):
  cfg = get_default_config()
  cfg.update(source="text", path="x.txt", tokenizer="hf", tokenizer_path=str(tmp_path))
  with pytest.raises(ValueError, match=r"^data\.tokenizer_path='.*' has no tokenizer\.json") as e:
    build_dataset(cfg)
  assert "\n" not in str(e.value)

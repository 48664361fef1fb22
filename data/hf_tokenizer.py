"""A Hugging Face tokenizer (`tokenizer.json`, the `tokenizers` library) behind the `Tokenizer`
interface: `data.tokenizer="hf"` with `data.tokenizer_path` a tokenizer.json or its directory.

Encoding applies the checkpoint's own normaliser, pre-tokeniser, model and post-processor, so the
special tokens it adds (Llama's BOS, BERT's [CLS] ... [SEP], none for GPT-2) are added exactly as
`tokenizers` / `transformers` add them with `add_special_tokens=True`; decoding skips special
tokens. The special ids (`bos_id`, `eos_id`, `pad_id`, `mask_id`, `unk_id`) come, in order of
precedence, from tokenizer_config.json next to tokenizer.json (`bos_token`, ...), from
config.json (`bos_token_id`, ... when inside the vocabulary), and else from the usual token
strings (`<s>`, `[CLS]`, `<|endoftext|>`, ...). The tokenizer serialises (`to_dict`) with its whole
tokenizer.json, so a run directory needs no copy of the original files to generate.
"""

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

SPECIALS = ("bos", "eos", "pad", "mask", "unk")
# Common spellings, tried in order when neither tokenizer_config.json nor config.json says.
_KNOWN = {
  "bos": ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]", "<|endoftext|>", "<|im_start|>"),
  "eos": ("</s>", "<|end_of_text|>", "<eos>", "[SEP]", "<|endoftext|>", "<|im_end|>"),
  "pad": ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>"),
  "mask": ("[MASK]", "<mask>"),
  "unk": ("<unk>", "[UNK]", "<|unk|>"),
}


def _content(value) -> str | None:
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def resolve_path(path: str) -> pathlib.Path:
  """tokenizer.json itself, or the one in directory `path`; one-line error if there is none."""
  p = pathlib.Path(path).expanduser()
  if p.is_dir():
    p = p / "tokenizer.json"
  if not p.is_file():
    raise ValueError(
      f"data.tokenizer_path={path!r} has no tokenizer.json (a Hugging Face tokenizer file or its "
      "directory)"
    )
  return p


class HFTokenizer:
  """A `tokenizers.Tokenizer` with the project's tokenizer interface.

  Args:
    tokenizer_json: The contents of tokenizer.json.
    special: Special token ids by kind ("bos", "eos", "pad", "mask", "unk"); missing kinds are
      looked up among the usual token strings.
  """

  name = "hf"

  def __init__(self, tokenizer_json: str, special: dict[str, int | None] | None = None):
    from tokenizers import Tokenizer  # Deferred: only this tokenizer needs the extension.

    self.tokenizer_json = tokenizer_json
    try:
      self._tok = Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # The Rust side raises its own exception type.
      raise ValueError(f"tokenizer.json could not be read: {str(e).splitlines()[0]}") from None
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1 if vocab else 0
    special = dict(special or {})
    for kind in SPECIALS:
      if special.get(kind) is None:
        special[kind] = next((vocab[t] for t in _KNOWN[kind] if t in vocab), None)
    self.special = {k: special[k] for k in SPECIALS}
    self.bos_id, self.eos_id = self.special["bos"], self.special["eos"]
    self.pad_id, self.mask_id = self.special["pad"], self.special["mask"]
    self.unk_id = self.special["unk"]

  @classmethod
  def from_path(cls, path: str) -> "HFTokenizer":
    """Reads tokenizer.json (a file or its directory) and the special tokens next to it."""
    file = resolve_path(path)
    text = file.read_text(encoding="utf-8")
    tok = cls(text)  # Vocabulary first, to look the special strings up.
    vocab = tok._tok.get_vocab(with_added_tokens=True)
    special: dict[str, int | None] = {}
    config = _read_json(file.parent / "config.json")
    for kind in SPECIALS:
      i = config.get(f"{kind}_token_id")
      if isinstance(i, int) and 0 <= i < tok.vocab_size:
        special[kind] = i
    tok_config = _read_json(file.parent / "tokenizer_config.json")
    for kind in SPECIALS:
      content = _content(tok_config.get(f"{kind}_token"))
      if content in vocab:
        special[kind] = vocab[content]
    return cls(text, special)

  def encode(self, text: str) -> np.ndarray:
    """int32 ids [len], with the special tokens the checkpoint's post-processor adds."""
    return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of `ids`, special tokens skipped (out-of-range ids dropped)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= 0) & (ids < self.vocab_size)]
    return self._tok.decode(ids.tolist(), skip_special_tokens=True)

  def to_dict(self) -> dict[str, Any]:
    """The whole tokenizer.json and the special ids."""
    return {"name": self.name, "tokenizer_json": self.tokenizer_json, "special": self.special}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "HFTokenizer":
    """Inverts `to_dict`."""
    return cls(d["tokenizer_json"], d.get("special"))

  def __repr__(self) -> str:
    return f"HFTokenizer(vocab_size={self.vocab_size}, specials={self.special})"


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  return data if isinstance(data, dict) else {}

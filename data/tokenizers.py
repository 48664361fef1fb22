"""Tokenizers for text sources: UTF-8 bytes, characters, a locally trained SentencePiece, and a
pretrained checkpoint's own (`hf`: tokenizer.json, see `data.hf_tokenizer`).

All of them share one small interface (`Tokenizer`): `encode(text) -> int32 ids`,
`decode(ids) -> str`, `vocab_size` and the special ids `pad_id`, `bos_id`, `eos_id`, `mask_id`
(`None` where a tokenizer has no such token). Each one serialises to a JSON-friendly dict
(`to_dict`), so a checkpoint directory can store the exact tokenizer a run used and
`tokenizer_from_dict` rebuilds it without the text.

- `ByteTokenizer`: ids 0..255 are UTF-8 bytes, specials follow; needs no training and no text.
- `CharTokenizer`: nanoGPT's char-level vocabulary, the sorted set of a text's characters
  (tinyshakespeare gives 65), optionally followed by special tokens.
- `SentencePieceTokenizer`: BPE or unigram trained in memory on the given text; lossless
  (identity normalisation, byte fallback), so `decode(encode(s)) == s`.
"""

import base64
import io
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from reslm.data.hf_tokenizer import HFTokenizer

TOKENIZER_NAMES = ("byte", "char", "sentencepiece", "hf")


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline and the entry points need from a tokenizer."""

  name: str
  vocab_size: int
  pad_id: int | None
  bos_id: int | None
  eos_id: int | None
  mask_id: int | None

  def encode(self, text: str) -> np.ndarray:
    """Returns the int32 ids of `text`, shape [len]."""
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Returns the text of `ids`; special ids are dropped."""
    ...

  def to_dict(self) -> dict[str, Any]:
    """Returns a JSON-serialisable description that `tokenizer_from_dict` inverts."""
    ...


def _as_id_array(ids: Sequence[int] | np.ndarray) -> np.ndarray:
  return np.asarray(ids, dtype=np.int64).reshape(-1)


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then pad=256, bos=257, eos=258, mask=259."""

  name = "byte"
  pad_id = 256
  bos_id = 257
  eos_id = 258
  mask_id = 259
  vocab_size = 260

  def encode(self, text: str) -> np.ndarray:
    """Returns the UTF-8 bytes of `text` as int32 ids, shape [num_bytes].

    Lone surrogates U+DC80..U+DCFF (undecodable bytes read with errors="surrogateescape") are
    those bytes again, so binary files round-trip byte for byte.
    """
    data = text.encode("utf-8", errors="surrogateescape")
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes byte ids, ignoring specials; invalid UTF-8 becomes U+FFFD."""
    ids = _as_id_array(ids)
    ids = ids[(ids >= 0) & (ids < 256)]
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def to_dict(self) -> dict[str, Any]:
    """Returns `{"name": "byte"}`."""
    return {"name": self.name}

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class CharTokenizer:
  """One id per character of a fixed alphabet (nanoGPT's char level), specials optional.

  With `add_specials`, pad/bos/eos/mask take the ids right after the characters, so the character
  ids (and a char-level checkpoint's embedding rows) are the same with or without specials.
  """

  name = "char"

  def __init__(self, chars: Sequence[str], add_specials: bool = False):
    """Builds the tokenizer from its alphabet.

    Args:
      chars: distinct single characters; sorted here so that ids follow code-point order.
      add_specials: whether to append pad, bos, eos and mask ids after the characters.

    Raises:
      ValueError: if `chars` is empty, repeats a character or holds a multi-character string.
    """
    chars = sorted(chars)
    if not chars:
      raise ValueError("CharTokenizer needs at least one character; got an empty alphabet")
    if any(len(c) != 1 for c in chars):
      raise ValueError(f"CharTokenizer chars must be single characters; got {chars!r}")
    if len(set(chars)) != len(chars):
      raise ValueError("CharTokenizer chars must be distinct")
    self.chars = tuple(chars)
    self.add_specials = add_specials
    # Sorted code points let `encode` map a whole text with one searchsorted.
    self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
    n = len(chars)
    self.pad_id, self.bos_id, self.eos_id, self.mask_id = (
      (n, n + 1, n + 2, n + 3) if add_specials else (None, None, None, None)
    )
    self.vocab_size = n + 4 if add_specials else n

  @classmethod
  def from_text(cls, text: str, add_specials: bool = False) -> "CharTokenizer":
    """Builds the alphabet from the sorted set of `text`'s characters."""
    return cls(sorted(set(text)), add_specials=add_specials)

  def encode(self, text: str) -> np.ndarray:
    """Returns the int32 ids of `text`'s characters, shape [num_chars].

    Raises:
      ValueError: naming the first character that is not in the alphabet.
    """
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # [num_chars]
    ids = np.searchsorted(self._codepoints, cps)
    ids_clipped = np.minimum(ids, len(self._codepoints) - 1)
    unknown = self._codepoints[ids_clipped] != cps
    if unknown.any():
      pos = int(np.argmax(unknown))
      raise ValueError(
        f"CharTokenizer cannot encode character {text[pos]!r} (at index {pos}); it is not in the "
        f"{len(self.chars)}-character vocabulary built from the training text"
      )
    return ids.astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Returns the characters of `ids`, dropping specials and out-of-range ids."""
    ids = _as_id_array(ids)
    ids = ids[(ids >= 0) & (ids < len(self.chars))]
    return "".join(self.chars[i] for i in ids.tolist())

  def to_dict(self) -> dict[str, Any]:
    """Returns the alphabet as one string plus the specials flag."""
    return {"name": self.name, "chars": "".join(self.chars), "add_specials": self.add_specials}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CharTokenizer":
    """Inverts `to_dict`."""
    return cls(list(d["chars"]), add_specials=bool(d.get("add_specials", False)))

  def __repr__(self) -> str:
    return f"CharTokenizer(num_chars={len(self.chars)}, add_specials={self.add_specials})"


class SentencePieceTokenizer:
  """A SentencePiece model held as its serialized proto; pad=0, unk=1, bos=2, eos=3, mask=4.

  Training uses identity normalisation, no dummy prefix and byte fallback, so every string round
  trips exactly; the mask token is the user-defined symbol "<mask>" (a literal "<mask>" in text
  encodes to it).
  """

  name = "sentencepiece"
  MASK_PIECE = "<mask>"

  def __init__(self, model_proto: bytes):
    """Loads a serialized SentencePiece model.

    Args:
      model_proto: the bytes of a `ModelProto`, as produced by `train` or a `.model` file.
    """
    import sentencepiece as spm  # Deferred: only this tokenizer needs the extension module.

    self.model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    self.vocab_size = int(self._sp.get_piece_size())

    def _opt(i: int) -> int | None:
      return None if i < 0 else int(i)

    self.unk_id = _opt(self._sp.unk_id())
    self.pad_id = _opt(self._sp.pad_id())
    self.bos_id = _opt(self._sp.bos_id())
    self.eos_id = _opt(self._sp.eos_id())
    mask = self._sp.piece_to_id(self.MASK_PIECE)
    self.mask_id = None if mask == self._sp.unk_id() else int(mask)

  @classmethod
  def train(
    cls,
    text: str,
    vocab_size: int,
    model_type: str = "bpe",
    *,
    character_coverage: float = 1.0,
    byte_fallback: bool = True,
    num_threads: int = 2,
  ) -> "SentencePieceTokenizer":
    """Trains a model in memory on the lines of `text`.

    Args:
      text: training text; each line is one training sentence.
      vocab_size: the target vocabulary size (a soft limit: a small text may give fewer pieces).
      model_type: "bpe" or "unigram".
      character_coverage: fraction of characters covered by single-character pieces.
      byte_fallback: encode characters outside the vocabulary as UTF-8 byte pieces (lossless).
      num_threads: training threads.

    Returns:
      The trained tokenizer.

    Raises:
      ValueError: for an unknown `model_type`, a text with no non-empty line, or a `vocab_size`
        too small for the text's characters (plus the 256 byte pieces with `byte_fallback`).
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
      raise ValueError(
        f"sentencepiece model_type={model_type!r} is not supported; choose one of: bpe, unigram"
      )
    lines = [line for line in text.splitlines() if line]
    if not lines:
      raise ValueError("cannot train a SentencePiece model on a text with no non-empty line")
    writer = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=[cls.MASK_PIECE],
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        # Identity normalisation and kept whitespace make decode(encode(s)) == s.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        num_threads=num_threads,
        minloglevel=2,
      )
    except RuntimeError as e:
      first_line = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
      raise ValueError(
        f"data.sentencepiece_vocab_size={vocab_size} could not be trained: {first_line}"
      ) from e
    return cls(writer.getvalue())

  def encode(self, text: str) -> np.ndarray:
    """Returns the int32 piece ids of `text`, shape [num_pieces]."""
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Returns the text of `ids`; control pieces (pad/bos/eos) decode to nothing."""
    ids = _as_id_array(ids)
    ids = ids[(ids >= 0) & (ids < self.vocab_size)]
    return self._sp.decode(ids.tolist())

  def to_dict(self) -> dict[str, Any]:
    """Returns the model proto as base64 text."""
    return {"name": self.name, "model_proto": base64.b64encode(self.model_proto).decode("ascii")}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "SentencePieceTokenizer":
    """Inverts `to_dict`."""
    return cls(base64.b64decode(d["model_proto"]))

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"


def _unknown_tokenizer(name: Any) -> ValueError:
  return ValueError(
    f"data.tokenizer={name!r} is not a known tokenizer; choose one of: {', '.join(TOKENIZER_NAMES)}"
  )


def build_tokenizer(name: str, *, text: str | None = None, **kwargs: Any) -> Tokenizer:
  """Builds a tokenizer by name.

  Args:
    name: one of `TOKENIZER_NAMES`.
    text: the text a "char" alphabet is built from or a "sentencepiece" model is trained on.
    **kwargs: passed on: `add_specials` for "char"; `vocab_size`, `model_type`, ... for
      "sentencepiece" (see `SentencePieceTokenizer.train`); `path` (tokenizer.json or its
      directory) for "hf".

  Returns:
    The tokenizer.

  Raises:
    ValueError: for an unknown name, or "char"/"sentencepiece" without `text`.
  """
  if name == "byte":
    return ByteTokenizer()
  if name == "hf":
    return HFTokenizer.from_path(kwargs["path"])
  if name not in TOKENIZER_NAMES:
    raise _unknown_tokenizer(name)
  if text is None:
    raise ValueError(f"data.tokenizer={name!r} is built from a text; pass text=...")
  if name == "char":
    return CharTokenizer.from_text(text, **kwargs)
  return SentencePieceTokenizer.train(text, **kwargs)


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
  """Rebuilds a tokenizer from its `to_dict()` output.

  Raises:
    ValueError: if `d["name"]` is not a known tokenizer.
  """
  name = d.get("name")
  if name == "byte":
    return ByteTokenizer()
  if name == "char":
    return CharTokenizer.from_dict(d)
  if name == "sentencepiece":
    return SentencePieceTokenizer.from_dict(d)
  if name == "hf":
    return HFTokenizer.from_dict(d)
  raise _unknown_tokenizer(name)

"""The `data` config section and the step-indexed `Dataset` built from it.

A batch is a pure function of `(data.seed, step)`: every draw comes from
`np.random.default_rng([seed, stream, step])`, never from iteration state, so a run resumed at
step k sees exactly the batches an uninterrupted run sees. Randomness is drawn for the GLOBAL
batch and each process keeps its `batch_size // process_count` rows, so the union of the
processes' rows equals the single-process batch whatever the process count.

Batches are dicts of numpy arrays:
  inputs   int32   [rows, seq_len]
  targets  int32   [rows, seq_len]
  weights  float32 [rows, seq_len]  loss mask (1 = scored)

Sources: the synthetic tasks of `data.synthetic` ("mqar", "copy", "listops") and "text", a corpus
tokenised once, split nanoGPT-style (first `train_fraction` of the tokens train, the rest val) and
sampled as random windows. `objective="mlm"` turns any source into BERT-style masked-LM batches
for encoder models.
"""

import functools
import os
from collections.abc import Callable

import ml_collections
import numpy as np

from reslm.data import synthetic, tokenizers
from reslm.data.hf_tokenizer import resolve_path
from reslm.data.text import load_text, looks_local

Batch = dict[str, np.ndarray]
# (rng, global_batch, rows of this process) -> this process's rows of a causal batch.
Sampler = Callable[[np.random.Generator, int, slice], Batch]

SOURCES = (*synthetic.TASKS, "text")
OBJECTIVES = ("causal", "mlm")
SENTENCEPIECE_MODEL_TYPES = ("bpe", "unigram")

# Independent seed streams: a batch's windows do not depend on the objective.
_TRAIN, _TRAIN_MLM, _EVAL, _EVAL_MLM = range(4)


def get_default_config() -> ml_collections.ConfigDict:
  """Returns the `data` section of an experiment config (unlocked; the experiment locks it)."""
  cfg = ml_collections.ConfigDict()
  cfg.source = "mqar"  # mqar | copy | listops | text
  cfg.path = ""  # text: local file / directory / glob, or a hub dataset id
  cfg.hf_config = ""  # text from the hub: dataset configuration ("" = default)
  cfg.hf_split = "train"  # text from the hub: split, slicing allowed ("train[:10%]")
  cfg.text_field = "text"
  cfg.tokenizer = "byte"  # byte | char | sentencepiece | hf (text only)
  cfg.tokenizer_path = ""  # hf: a tokenizer.json or its directory (a Hugging Face model's)
  cfg.char_add_specials = False  # char: append pad/bos/eos/mask (needed for mlm)
  cfg.sentencepiece_vocab_size = 1024
  cfg.sentencepiece_model_type = "bpe"  # bpe | unigram
  cfg.vocab_size = 0  # synthetic: task vocab (0 = default); text: pad the tokenizer's up to this
  cfg.seq_len = 256
  cfg.batch_size = 32  # GLOBAL batch, split evenly over processes
  cfg.eval_batch_size = 0  # 0 = batch_size
  cfg.seed = 0
  cfg.train_fraction = 0.9  # text: first 90% of tokens train, last 10% val (nanoGPT)
  cfg.objective = "causal"  # causal (next token) | mlm (BERT-style masked LM)
  cfg.mask_prob = 0.15
  cfg.mqar = ml_collections.ConfigDict({"num_kv_pairs": 8})
  cfg.copy = ml_collections.ConfigDict()
  cfg.listops = ml_collections.ConfigDict({"max_depth": 4, "max_args": 5})
  return cfg


def _one_of(setting: str, value, allowed, what: str) -> None:
  if value not in allowed:
    raise ValueError(
      f"data.{setting}={value!r} is not a known {what}; choose one of: {', '.join(allowed)}"
    )


def _task_options(cfg: ml_collections.ConfigDict, task: synthetic.Task) -> dict:
  section = cfg.get(task.name) or {}
  return {k: section[k] for k in task.options if k in section}


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Checks every setting of the `data` section alone; call before building anything.

  Raises:
    ValueError: a one-line message naming the first bad setting, its value and what is allowed.
  """
  _one_of("source", cfg.source, SOURCES, "source")
  _one_of("tokenizer", cfg.tokenizer, tokenizers.TOKENIZER_NAMES, "tokenizer")
  _one_of("objective", cfg.objective, OBJECTIVES, "objective")
  for name in ("seq_len", "batch_size"):
    if not isinstance(cfg[name], int) or cfg[name] <= 0:
      raise ValueError(f"data.{name}={cfg[name]!r} must be a positive integer")
  for name in ("eval_batch_size", "vocab_size", "seed"):
    if not isinstance(cfg[name], int) or cfg[name] < 0:
      raise ValueError(f"data.{name}={cfg[name]!r} must be an integer >= 0")
  if not 0.0 < cfg.train_fraction < 1.0:
    raise ValueError(f"data.train_fraction={cfg.train_fraction!r} must be in (0, 1), e.g. 0.9")
  if not 0.0 < cfg.mask_prob < 1.0:
    raise ValueError(f"data.mask_prob={cfg.mask_prob!r} must be in (0, 1), e.g. 0.15")

  if cfg.source == "text":
    if not cfg.path:
      raise ValueError(
        "data.path='' is empty; data.source='text' needs a local text path or hub id"
      )
    if cfg.tokenizer == "sentencepiece":
      _one_of(
        "sentencepiece_model_type",
        cfg.sentencepiece_model_type,
        SENTENCEPIECE_MODEL_TYPES,
        "model type",
      )
      if cfg.sentencepiece_vocab_size <= 0:
        raise ValueError(
          f"data.sentencepiece_vocab_size={cfg.sentencepiece_vocab_size} must be positive"
        )
    if cfg.tokenizer == "hf":
      resolve_path(cfg.get("tokenizer_path", ""))
    if cfg.objective == "mlm" and cfg.tokenizer == "char" and not cfg.char_add_specials:
      raise ValueError(
        "data.objective='mlm' needs a mask token but data.tokenizer='char' has none; "
        "set data.char_add_specials=True"
      )
    return

  task = synthetic.get_task(cfg.source)
  vocab_size = task.resolve_vocab_size(cfg.vocab_size)
  # One row exercises the task's own size checks (pairs vs seq_len, vocab vs pairs, ...).
  task.generate(np.random.default_rng(0), 1, cfg.seq_len, vocab_size, **_task_options(cfg, task))


class Dataset:
  """Deterministic, step-indexed batches of one process's rows.

  Attributes:
    source: the `data.source` it was built from.
    vocab_size: embedding rows the model needs (includes the mask token for synthetic mlm).
    tokenizer: the text tokenizer, or None for synthetic tasks.
    bytes_per_token: mean UTF-8 bytes per token on the val split (for bits per byte), or None.
    pad_id: the pad / filler id, or None if the tokenizer has none.
    mask_id: the mlm mask id, or None for the causal objective without one.
    seq_len: tokens per row.
    batch_size: the global batch.
    eval_batch_size: the global eval batch.
    rows_per_process: rows `train_batch` returns (batch_size // process_count).
  """

  def __init__(
    self,
    *,
    cfg: ml_collections.ConfigDict,
    process_index: int,
    process_count: int,
    vocab_size: int,
    tokenizer: tokenizers.Tokenizer | None,
    bytes_per_token: float | None,
    pad_id: int | None,
    mask_id: int | None,
    random_token_ids: np.ndarray,
    train_sampler: Sampler,
    eval_sampler: Sampler,
    summary: str,
  ):
    self.source = cfg.source
    self.seq_len = cfg.seq_len
    self.batch_size = cfg.batch_size
    self.eval_batch_size = cfg.eval_batch_size or cfg.batch_size
    self.seed = cfg.seed
    self.objective = cfg.objective
    self.mask_prob = cfg.mask_prob
    self.process_index = process_index
    self.process_count = process_count
    self.rows_per_process = self.batch_size // process_count
    self.vocab_size = vocab_size
    self.tokenizer = tokenizer
    self.bytes_per_token = bytes_per_token
    self.pad_id = pad_id
    self.mask_id = mask_id
    self._random_token_ids = random_token_ids  # what mlm's "random token" replacements draw from
    self._train_sampler = train_sampler
    self._eval_sampler = eval_sampler
    self._summary = summary

  def _rows(self, global_batch: int) -> slice:
    per = global_batch // self.process_count
    return slice(self.process_index * per, (self.process_index + 1) * per)

  def _make(self, sampler: Sampler, streams: tuple[int, int], seed: int, index: int, gb: int):
    rows = self._rows(gb)
    batch = sampler(np.random.default_rng([seed, streams[0], index]), gb, rows)
    if self.objective == "mlm":
      batch = self._mask(batch, np.random.default_rng([seed, streams[1], index]), gb, rows)
    return batch

  def _mask(self, batch: Batch, rng: np.random.Generator, gb: int, rows: slice) -> Batch:
    """BERT-style corruption of the clean `inputs`; targets are the clean tokens (unshifted)."""
    clean = batch["inputs"]  # [rows, seq]
    shape = (gb, self.seq_len)
    # Global draws, then this process's rows: the corruption is independent of process_count.
    chosen = (rng.random(shape) < self.mask_prob)[rows]  # [rows, seq]
    action = rng.random(shape)[rows]
    random_ids = self._random_token_ids[rng.integers(0, len(self._random_token_ids), shape)][rows]
    if self.pad_id is not None:
      chosen &= clean != self.pad_id  # filler is never a prediction target
    corrupted = np.where(chosen & (action < 0.8), self.mask_id, clean)
    corrupted = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, corrupted)
    return {
      "inputs": corrupted.astype(np.int32),
      "targets": clean.astype(np.int32),
      "weights": chosen.astype(np.float32),
    }

  def train_batch(self, step: int) -> Batch:
    """Returns this process's rows of the training batch for `step` (a pure function of it).

    Raises:
      ValueError: if step is negative.
    """
    if step < 0:
      raise ValueError(f"step={step} must be >= 0")
    return self._make(self._train_sampler, (_TRAIN, _TRAIN_MLM), self.seed, step, self.batch_size)

  def eval_batches(self, num_batches: int) -> list[Batch]:
    """Returns `num_batches` fixed eval batches (this process's rows), the same on every call."""
    return [
      self._make(self._eval_sampler, (_EVAL, _EVAL_MLM), self.seed, i, self.eval_batch_size)
      for i in range(num_batches)
    ]

  def describe(self) -> str:
    """Returns a one-line human-readable summary."""
    return (
      f"{self._summary}; vocab {self.vocab_size}, seq_len {self.seq_len}, {self.objective} "
      f"objective, global batch {self.batch_size} ({self.rows_per_process} rows on process "
      f"{self.process_index} of {self.process_count}), eval batch {self.eval_batch_size}, "
      f"seed {self.seed}"
    )

  def __repr__(self) -> str:
    return f"Dataset({self.describe()})"


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def _path_stamp(path: str) -> float | None:
  """A modification time so the token cache notices a rewritten local file."""
  expanded = os.path.expanduser(path)
  return os.path.getmtime(expanded) if looks_local(path) and os.path.exists(expanded) else None


@functools.lru_cache(maxsize=4)
def _tokenized_text(path, hf_config, split, text_field, tokenizer_name, tokenizer_kwargs, stamp):
  """Loads and tokenises a corpus once per (source, tokenizer); `stamp` only keys the cache."""
  del stamp
  # The byte tokenizer takes any file's bytes; the others need UTF-8 text.
  errors = "surrogateescape" if tokenizer_name == "byte" else "strict"
  text = load_text(path, split=split, text_field=text_field, hf_config=hf_config, errors=errors)
  tok = tokenizers.build_tokenizer(tokenizer_name, text=text, **dict(tokenizer_kwargs))
  ids = tok.encode(text)  # [num_tokens]
  ids.flags.writeable = False  # shared by every Dataset built from the cache
  return tok, ids


def _window_sampler(tokens: np.ndarray, seq_len: int) -> Sampler:
  """nanoGPT windows: offsets o, inputs tok[o:o+T], targets tok[o+1:o+T+1], weights all 1."""

  def sample(rng: np.random.Generator, global_batch: int, rows: slice) -> Batch:
    offsets = rng.integers(0, len(tokens) - seq_len, size=global_batch)[rows]  # [rows]
    windows = tokens[offsets[:, None] + np.arange(seq_len + 1)]  # [rows, seq + 1]
    return {
      "inputs": windows[:, :-1].astype(np.int32),
      "targets": windows[:, 1:].astype(np.int32),
      "weights": np.ones((len(offsets), seq_len), dtype=np.float32),
    }

  return sample


def _build_text(cfg: ml_collections.ConfigDict, process_index: int, process_count: int):
  if cfg.tokenizer == "char":
    tok_kwargs = (("add_specials", cfg.char_add_specials),)
  elif cfg.tokenizer == "sentencepiece":
    tok_kwargs = (
      ("vocab_size", cfg.sentencepiece_vocab_size),
      ("model_type", cfg.sentencepiece_model_type),
    )
  elif cfg.tokenizer == "hf":
    tok_kwargs = (("path", str(resolve_path(cfg.tokenizer_path))),)
  else:
    tok_kwargs = ()
  tok, ids = _tokenized_text(
    cfg.path,
    cfg.hf_config,
    cfg.hf_split,
    cfg.text_field,
    cfg.tokenizer,
    tok_kwargs,
    _path_stamp(cfg.path),
  )
  if cfg.objective == "mlm" and tok.mask_id is None:
    raise ValueError(
      f"data.objective='mlm' needs a mask token but data.tokenizer={cfg.tokenizer!r} has none"
    )
  if cfg.vocab_size and cfg.vocab_size < tok.vocab_size:
    raise ValueError(
      f"data.vocab_size={cfg.vocab_size} is smaller than the {cfg.tokenizer} tokenizer's "
      f"{tok.vocab_size}; set 0 or a value >= {tok.vocab_size}"
    )
  n_train = int(len(ids) * cfg.train_fraction)
  splits = {"train": ids[:n_train], "val": ids[n_train:]}
  for name, split_ids in splits.items():
    if len(split_ids) < cfg.seq_len + 1:
      raise ValueError(
        f"data.path={cfg.path!r} gives {len(split_ids)} {name} tokens with "
        f"data.train_fraction={cfg.train_fraction}, fewer than data.seq_len + 1 = "
        f"{cfg.seq_len + 1}; use a longer text or a smaller data.seq_len"
      )
  if tok.name == "byte":  # One byte per id (decoding would turn undecodable bytes into U+FFFD).
    val_bytes = int(np.sum(splits["val"] < 256))
  else:
    val_bytes = len(tok.decode(splits["val"]).encode("utf-8"))
  specials = {tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, getattr(tok, "unk_id", None)}
  regular = np.array([i for i in range(tok.vocab_size) if i not in specials], dtype=np.int64)
  return Dataset(
    cfg=cfg,
    process_index=process_index,
    process_count=process_count,
    vocab_size=max(cfg.vocab_size, tok.vocab_size),
    tokenizer=tok,
    bytes_per_token=val_bytes / len(splits["val"]),
    pad_id=tok.pad_id,
    mask_id=tok.mask_id,
    random_token_ids=regular,
    train_sampler=_window_sampler(splits["train"], cfg.seq_len),
    eval_sampler=_window_sampler(splits["val"], cfg.seq_len),
    summary=(
      f"text {cfg.path!r} ({cfg.tokenizer} tokenizer): {len(splits['train']):,} train / "
      f"{len(splits['val']):,} val tokens, {val_bytes / len(splits['val']):.3f} bytes/token"
    ),
  )


# ---------------------------------------------------------------------------------------------
# Synthetic
# ---------------------------------------------------------------------------------------------


def _build_synthetic(cfg: ml_collections.ConfigDict, process_index: int, process_count: int):
  task = synthetic.get_task(cfg.source)
  task_vocab = task.resolve_vocab_size(cfg.vocab_size)
  options = _task_options(cfg, task)

  def sample(rng: np.random.Generator, global_batch: int, rows: slice) -> Batch:
    # The whole global batch is generated (cheap) so rows never depend on process_count.
    batch = task.generate(rng, global_batch, cfg.seq_len, task_vocab, **options)
    return {k: v[rows] for k, v in batch.items()}

  mlm = cfg.objective == "mlm"
  option_text = ", ".join(f"{k}={v}" for k, v in options.items())
  return Dataset(
    cfg=cfg,
    process_index=process_index,
    process_count=process_count,
    # mlm reserves one id past the task's vocabulary for the mask token.
    vocab_size=task_vocab + 1 if mlm else task_vocab,
    tokenizer=None,
    bytes_per_token=None,
    pad_id=synthetic.PAD_ID,
    mask_id=task_vocab if mlm else None,
    random_token_ids=np.arange(1, task_vocab),
    train_sampler=sample,
    eval_sampler=sample,
    summary=f"synthetic {cfg.source}({option_text})",
  )


def build_dataset(
  cfg: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1
) -> Dataset:
  """Validates the `data` section and builds this process's `Dataset`.

  Args:
    cfg: the `data` config section (see `get_default_config`).
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing the global batch.

  Returns:
    The dataset.

  Raises:
    ValueError: for any bad setting, a global batch not divisible by process_count, a text split
      shorter than seq_len + 1 tokens, or mlm without a mask token.
  """
  validate_config(cfg)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  for name in ("batch_size", "eval_batch_size"):
    value = cfg[name] or cfg.batch_size
    if value % process_count:
      raise ValueError(
        f"data.{name}={value} must be divisible by the process count ({process_count}) so every "
        f"process gets the same number of rows"
      )
  if cfg.source == "text":
    return _build_text(cfg, process_index, process_count)
  return _build_synthetic(cfg, process_index, process_count)

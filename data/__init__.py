"""Data for experiments: tokenizers, synthetic tasks, text loading and step-indexed batches.

`build_dataset(config.data)` returns a `Dataset` whose `train_batch(step)` is a pure function of
`(seed, step)` and holds only this process's rows of the global batch.
"""

from reslm.data.hf_tokenizer import HFTokenizer
from reslm.data.pipeline import Dataset, build_dataset, get_default_config, validate_config
from reslm.data.synthetic import TASKS, copy_task, evaluate_listops, listops, mqar
from reslm.data.text import load_text
from reslm.data.tokenizers import (
  ByteTokenizer,
  CharTokenizer,
  SentencePieceTokenizer,
  Tokenizer,
  build_tokenizer,
  tokenizer_from_dict,
)

__all__ = [
  "TASKS",
  "ByteTokenizer",
  "CharTokenizer",
  "Dataset",
  "HFTokenizer",
  "SentencePieceTokenizer",
  "Tokenizer",
  "build_dataset",
  "build_tokenizer",
  "copy_task",
  "evaluate_listops",
  "get_default_config",
  "listops",
  "load_text",
  "mqar",
  "tokenizer_from_dict",
  "validate_config",
]

"""Loads a text corpus as one string, from local files or the Hugging Face hub.

`load_text` serves two kinds of `data.path`:

- A local path (a file, a directory of `.txt` files, or a glob) is read with the `datasets` "text"
  builder, one document per file, and the documents are joined. This is what the tests and the
  offline smoke runs use (e.g. nanoGPT's tinyshakespeare as a single file).
- Anything else is a hub dataset id ("name" or "owner/name"): `datasets.load_dataset(name,
  hf_config, split=split)` and the `text_field` column joined. This is the real loader for users
  with network access; `split` accepts slicing such as "train[:1%]" to keep big corpora in memory.
  The hub is unreachable in this workplace, so only the local path is exercised by tests.

Bad settings fail with a one-line `ValueError` naming the setting before any loading starts.
A local file that is not UTF-8 text is an error naming the file and the first bad byte, unless
the caller asks for `errors="surrogateescape"` (the byte tokenizer: bytes are the point), which
reads the files' bytes as they are (undecodable bytes become lone surrogates that
`ByteTokenizer.encode` turns back into the same bytes).
"""

import glob
import os

_TEXT_SUFFIXES = (".txt", ".text", ".md")
_GLOB_CHARS = ("*", "?", "[")


def looks_local(path: str) -> bool:
  """Whether `path` names local files rather than a hub dataset id.

  Hub ids are "name" or "owner/name"; anything that exists, is absolute or explicitly relative,
  uses `~`, a glob or a text suffix, or nests deeper than one "/" is taken as local.
  """
  if os.path.exists(os.path.expanduser(path)):
    return True
  if path.startswith((".", "~", os.sep)) or (os.altsep and path.startswith(os.altsep)):
    return True
  if any(c in path for c in _GLOB_CHARS) or path.lower().endswith(_TEXT_SUFFIXES):
    return True
  return path.count("/") + (path.count(os.sep) if os.sep != "/" else 0) > 1


def _local_files(path: str) -> list[str]:
  """Returns the sorted text files `path` names.

  Raises:
    ValueError: if nothing matches, or all matched files are empty.
  """
  expanded = os.path.expanduser(path)
  if os.path.isdir(expanded):
    files = glob.glob(os.path.join(expanded, "**", "*.txt"), recursive=True)
    if not files:
      raise ValueError(f"data.path={path!r} is a directory with no .txt files")
  elif os.path.isfile(expanded):
    files = [expanded]
  elif any(c in path for c in _GLOB_CHARS):
    files = glob.glob(expanded, recursive=True)
  else:
    files = []
  files = sorted(f for f in files if os.path.isfile(f))
  if not files:
    raise ValueError(f"data.path={path!r} does not exist")
  if all(os.path.getsize(f) == 0 for f in files):
    raise ValueError(f"data.path={path!r} is empty (0 bytes in {len(files)} file(s))")
  return files


def _join_column(ds, path: str, text_field: str) -> str:
  """Joins one string column of a `datasets.Dataset`, checking the column exists."""
  if text_field not in ds.column_names:
    raise ValueError(
      f"data.text_field={text_field!r} is not a column of data.path={path!r}; "
      f"available columns: {', '.join(ds.column_names)}"
    )
  docs = [d for d in ds[text_field] if d]
  text = "\n".join(docs)
  if not text:
    raise ValueError(f"data.path={path!r} is empty (no text in column {text_field!r})")
  return text


def _first_undecodable(files: list[str]) -> tuple[str, UnicodeDecodeError] | None:
  """The first file that is not valid UTF-8, with the decode error (None if all are)."""
  for f in files:
    with open(f, "rb") as fh:
      data = fh.read()
    try:
      data.decode("utf-8")
    except UnicodeDecodeError as e:
      return f, e
  return None


def _read_bytes_as_text(files: list[str]) -> str:
  """Files joined with "\\n", every byte kept (invalid UTF-8 as lone surrogates, no newline
  translation)."""
  parts = []
  for f in files:
    with open(f, encoding="utf-8", errors="surrogateescape", newline="") as fh:
      parts.append(fh.read())
  return "\n".join(p for p in parts if p)


def load_text(
  path_or_name: str,
  *,
  split: str = "train",
  text_field: str = "text",
  hf_config: str | None = None,
  errors: str = "strict",
) -> str:
  """Returns the whole corpus as one string; documents are joined with "\\n".

  A single local file comes back exactly as stored (one document).

  Args:
    path_or_name: a local file, directory of `.txt` files or glob; else a hub dataset id.
    split: hub split (slicing allowed); local files are always the whole text.
    text_field: the column holding the text ("text" for local files).
    hf_config: hub dataset configuration name; "" or None for the default.
    errors: "strict" (local files must be UTF-8) or "surrogateescape" (any bytes; see above).

  Returns:
    The text.

  Raises:
    ValueError: for an empty `path_or_name`, a local path that does not exist, an empty corpus,
      a local file that is not UTF-8 (with errors="strict"), or a `text_field` that is not a
      column.
  """
  if not path_or_name:
    raise ValueError("data.path='' is empty; set a local text file/directory or a hub dataset id")
  if errors not in ("strict", "surrogateescape"):
    raise ValueError(f"errors={errors!r}; choose 'strict' or 'surrogateescape'")
  if looks_local(path_or_name):
    files = _local_files(path_or_name)
    bad = _first_undecodable(files)
    if bad is not None:
      if errors == "surrogateescape":
        return _read_bytes_as_text(files)
      f, e = bad
      raise ValueError(
        f"data.path={path_or_name!r}: {f} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
        f"offset {e.start}); use data.tokenizer='byte' to train on raw bytes"
      )
    import datasets  # Deferred: a slow import only the text source needs.

    ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
    return _join_column(ds, path_or_name, text_field)

  import datasets

  ds = datasets.load_dataset(path_or_name, hf_config or None, split=split)
  return _join_column(ds, path_or_name, text_field)

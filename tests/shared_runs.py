"""Expensive fixtures' outputs built once per test session and shared across xdist workers."""

import fcntl
import os
import pathlib
import shutil

import numpy as np


def shared_dir(tmp_path_factory, name: str, build) -> pathlib.Path:
  """`build(path)` once per test session, shared by all xdist workers (guarded by a file lock)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # The session's directory, common to the workers.
  path = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / f"{name}.done").exists():
      shutil.rmtree(path, ignore_errors=True)
      build(path)
      (root / f"{name}.done").write_text("")
  return path


def pseudo_english(n_chars: int) -> str:
  """Deterministic pseudo-English with enough structure for a char model to learn a little (a
  stand-in for Tiny Shakespeare where ../shared/data is absent, as in CI)."""
  rng = np.random.default_rng(0)
  words = ["to", "be", "or", "not", "the", "king", "lord", "my", "thou", "art", "so", "fair"]
  out, size = [], 0
  while size < n_chars:
    line = " ".join(rng.choice(words, size=rng.integers(3, 9))).capitalize() + ".\n"
    out.append(line)
    size += len(line)
  return "".join(out)

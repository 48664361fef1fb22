"""Expensive fixtures' outputs built once per test session and shared across xdist workers."""

import fcntl
import os
import pathlib
import shutil


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

"""Per-file SHA-256 manifests for checkpoint directories.

Orbax writes checkpoints atomically (a torn write never becomes a step) but does not detect bits
that change afterwards: a flipped bit in a data file restores without error as a wrong weight (or a
NaN). `seal(step_dir)` records every file's size and SHA-256 once the step is committed;
`problem(step_dir)` recomputes them on restore and names the first file that differs. A step
without a manifest (written before manifests existed, or killed between commit and seal) is not
verifiable and counts as intact.
"""

import hashlib
import json
import os

MANIFEST = "checksums.json"
_CHUNK = 1 << 20


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST and not rel.startswith(f"{MANIFEST}."):
        out.append(rel)
  return sorted(out)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def is_sealed(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, MANIFEST))


def seal(step_dir: str) -> None:
  """Writes `step_dir/checksums.json`: {relative path: [size, sha256]} of every file."""
  entries = {}
  for rel in _files(step_dir):
    path = os.path.join(step_dir, rel)
    entries[rel] = [os.path.getsize(path), _sha256(path)]
  tmp = os.path.join(step_dir, f"{MANIFEST}.tmp{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump({"algorithm": "sha256", "files": entries}, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def problem(step_dir: str) -> str | None:
  """None if every file in the manifest is present and unchanged (or there is no manifest);
  else a short description of the first difference."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its checksum manifest is unreadable ({type(e).__name__})"
  for rel, (size, digest) in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    try:
      if os.path.getsize(full) != size:
        return f"{rel}: size changed"
      if _sha256(full) != digest:
        return f"{rel}: checksum mismatch"
    except OSError as e:
      return f"{rel}: {e.strerror or e}"
  return None

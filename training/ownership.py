"""Which command owns an output directory: a marker file, checked before anything is written.

Every command that writes into a directory (train's `--workdir`, compress's `--out`, an
ablation's `--workdir`, the compression benchmark's `--workdir`) first calls `claim`. Writing
replaces and deletes files (orbax keeps only the newest checkpoints), so a directory is accepted
only if it is new or empty, carries this command's marker (for compress: of the same compression),
or holds nothing but what this command writes (runs from before markers existed). Anything else is
refused with one line naming the path and what it holds, before any data is read or compiled: the
rule is never to delete what this command did not write.
"""

import dataclasses
import fnmatch
import json
import os
from collections.abc import Callable
from typing import Any

MARKER = ".reslm-owner.json"


@dataclasses.dataclass(frozen=True)
class Kind:
  """A kind of output directory.

  Attributes:
    command: The command that writes it, e.g. "experiments.train".
    what: What it holds, for messages: "a training run".
    outputs: Glob patterns of the top-level entries the command writes (a trailing "/" matches
      directories only); an unmarked directory holding only these is adopted.
    recognize: Optional stricter test of an unmarked directory, `(path, key) -> bool`: e.g. that
      its subdirectories are themselves runs, or that its report names the same source.
  """

  command: str
  what: str
  outputs: tuple[str, ...]
  recognize: Callable[[str, Any], bool] | None = None

  def written_by(self, path: str, key: Any = None) -> bool:
    """Whether every top-level entry of `path` is one this command writes (and `recognize`)."""
    for name in os.listdir(path):
      if name == MARKER:
        continue
      is_dir = os.path.isdir(os.path.join(path, name))
      if not any(_matches(name, p, is_dir) for p in self.outputs):
        return False
    return self.recognize is None or self.recognize(path, key)


def _matches(name: str, pattern: str, is_dir: bool) -> bool:
  if pattern.endswith("/"):
    return is_dir and fnmatch.fnmatchcase(name, pattern[:-1])
  return fnmatch.fnmatchcase(name, pattern)


def read_marker(path: str) -> dict[str, Any] | None:
  """The marker of `path`, or None (no marker, or an unreadable one)."""
  try:
    with open(os.path.join(path, MARKER)) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) else None


def _listing(path: str, limit: int = 4) -> str:
  names = sorted(n for n in os.listdir(path) if n != MARKER)
  shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
  return shown


def _normal(key: Any) -> Any:
  """A JSON round trip, so a key compares equal to the one read back from a marker."""
  return json.loads(json.dumps(key, sort_keys=True, default=str))


def check(
  path: str,
  kind: Kind,
  *,
  flag: str,
  key: Any = None,
  others: tuple[Kind, ...] = (),
) -> None:
  """Raises unless `kind` may write into `path` (see the module docstring); writes nothing.

  Args:
    path: The output directory.
    kind: What the command writes there.
    flag: The setting that named `path`, for messages ("--workdir").
    key: What identifies one output of the kind (compress: the source run and the settings); an
      existing marker with another key is refused. None: any output of the kind.
    others: Other kinds, to say what a refused directory holds ("a training run").

  Raises:
    ValueError: One line naming the path and what it holds.
  """
  where = f"{flag}={path}"
  if os.path.lexists(path) and not os.path.isdir(path):
    raise ValueError(f"{where} is a file, not a directory; give a directory for {kind.what}")
  if not os.path.isdir(path):
    return
  try:
    entries = [n for n in os.listdir(path) if n != MARKER]
  except OSError as e:
    raise ValueError(f"{where} cannot be read: {e.strerror}") from e
  marker = read_marker(path)
  if marker is not None:
    if marker.get("command") != kind.command:
      held = next((k.what for k in others if k.command == marker.get("command")), None)
      held = held or f"the output of {marker.get('command')!r}"
      raise ValueError(
        f"{where} holds {held}, not {kind.what}; writing there would replace its files; "
        "choose a new or empty directory"
      )
    if key is not None and marker.get("key") != _normal(key):
      raise ValueError(
        f"{where} holds {kind.what} from other settings ("
        f"{_difference(marker.get('key'), _normal(key))}); choose a new directory or remove it"
      )
    return
  if not entries or kind.written_by(path, key):
    return
  held = next((k.what for k in others if k.written_by(path)), None)
  what = held or f"files {kind.command} did not write ({_listing(path)})"
  raise ValueError(
    f"{where} holds {what}; writing {kind.what} there could replace or delete them; "
    "choose a new or empty directory"
  )


def _difference(old: Any, new: Any) -> str:
  if isinstance(old, dict) and isinstance(new, dict):
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
      return "different " + ", ".join(differ)
  return "different settings"


def claim(
  path: str,
  kind: Kind,
  *,
  flag: str,
  key: Any = None,
  others: tuple[Kind, ...] = (),
  write: bool = True,
) -> None:
  """`check`, then creates `path` and marks it as `kind`'s (unless `write` is False).

  Multi-process jobs call this on every process (each refuses alike) with `write` only on one.

  Raises:
    ValueError: As `check`, or `path` cannot be created or written (one line: why).
  """
  check(path, kind, flag=flag, key=key, others=others)
  if not write:
    return
  marker = {"command": kind.command, "key": _normal(key)}
  if read_marker(path) == marker:
    return
  try:
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f"{MARKER}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
      json.dump(marker, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, MARKER))
  except OSError as e:
    raise ValueError(f"{flag}={path} is not writable: {e.strerror or e}") from e

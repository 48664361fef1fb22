"""Orbax checkpoints: the latest K by step, the best by eval loss, auto-resume, clear mismatches.

Layout under the workdir:
  checkpoints/<step>/{state, meta, checksums.json}   the most recent `keep` checkpoints (resume)
  best/<step>/{state, meta, checksums.json}          the checkpoint with the lowest eval loss

`meta` is JSON: the resolved model config and the tokenizer, so evaluation and generation can
rebuild the model from the workdir alone and a checkpoint is never read into a different model.

Reliability rules:
- `checksums.json` (`training.checksums`) is written once a step is committed and verified on
  restore; a damaged step is skipped with a one-line warning naming it, for the newest intact one.
- An unreadable `best/` never blocks resuming: it is moved aside with a warning.
- A full disk is one `DiskFullError` line (what, where, how much space), and the partial step is
  removed; the last committed checkpoint stays usable.
- A read-only Checkpointer (`read_only=True`: evaluation, generation, compression) involves only
  this process (no cross-process barriers) and restores onto this process's first device, so it
  loads a checkpoint written by any number of processes.
"""

import contextlib
import errno
import glob
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from reslm.training import checksums


class DiskFullError(RuntimeError):
  """A checkpoint could not be written for lack of space (the message is one line)."""


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _handlers():
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def warn(message: str) -> None:
  """One `warning:` line on stderr, from process 0 only."""
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _disk_full(e: BaseException) -> bool:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(e) or "os_error_code='28'" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _size(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


def _nbytes(tree) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


class _UnreadableError(ValueError):
  """A step whose files could not be read (the caller may fall back to an older one)."""


class Checkpointer:
  """Saves and restores `TrainState`-like pytrees with JSON metadata.

  Args:
    workdir: Run directory.
    keep: How many recent checkpoints to keep.
    keep_best: Also keep the lowest-eval-loss checkpoint under `workdir/best`.
    async_save: Write in a background thread (`wait()` blocks until written).
    read_only: Only read (evaluation, generation, compression): no directories are created, no
      other process takes part, and arrays restore onto this process's first device unless the
      target says otherwise.
  """

  def __init__(
    self,
    workdir: str,
    *,
    keep: int = 3,
    keep_best: bool = True,
    async_save: bool = True,
    read_only: bool = False,
  ):
    self.workdir = os.path.abspath(workdir)
    self.read_only = read_only
    self.async_save = async_save and not read_only
    self._pending: list[tuple[Any, int, int]] = []  # (manager, step, bytes) being written
    self.latest = self._open("checkpoints", keep)
    self.best = None
    if keep_best:
      try:
        best_dir = os.path.join(self.workdir, "best")
        if os.path.lexists(best_dir) and not os.path.isdir(best_dir):
          raise NotADirectoryError(f"{best_dir} is not a directory")
        self.best = self._open("best", 1, best=True)
      except Exception as e:  # Orbax raises many types for unreadable metadata.
        self.best = self._reopen_best(e)

  def _multiprocessing(self, name: str):
    """Read-only: this process alone; writers: each manager its own barrier names (latest and
    best saving the same step at once would otherwise collide across processes)."""
    one_process = self.read_only and jax.process_count() > 1
    return ocp.options.MultiprocessingOptions(
      primary_host=jax.process_index() if one_process else 0,
      active_processes={jax.process_index()} if one_process else None,
      barrier_sync_key_prefix=name,
    )

  def _open(self, name: str, keep: int, *, best: bool = False):
    multiprocessing = self._multiprocessing(name)
    if self.read_only:
      opts = ocp.CheckpointManagerOptions(
        read_only=True, create=False, multiprocessing_options=multiprocessing
      )
    else:
      opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=self.async_save,
        create=True,
        cleanup_tmp_directories=True,  # Partial steps of a killed or failed write: ours.
        multiprocessing_options=multiprocessing,
        **({"best_fn": lambda m: m["eval_loss"], "best_mode": "min"} if best else {}),
      )
    return ocp.CheckpointManager(
      os.path.join(self.workdir, name), item_handlers=_handlers(), options=opts
    )

  def _reopen_best(self, error: Exception):
    where = os.path.join(self.workdir, "best")
    reason = (
      f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    )
    if self.read_only:
      warn(f"best checkpoints in {where} are unreadable ({reason})")
      return None
    aside = where + ".unreadable"
    n = 1
    while os.path.exists(aside):
      n += 1
      aside = f"{where}.unreadable{n}"
    if jax.process_index() == 0:
      os.rename(where, aside)
    warn(f"best checkpoints in {where} are unreadable ({reason}); moved to {aside}, new best/")
    return self._open("best", 1, best=True)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  # Saving.

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Saves `state` at `step` unless that step is already saved.

    The previous save (of either kind) is finished and sealed first, so a resumable checkpoint
    saved before a best copy is on disk before the copy takes space.
    """
    self._finish()
    if step not in self.latest.all_steps():
      self._start(self.latest, step, state, meta)

  def save_best(self, step: int, state, meta: dict[str, Any], eval_loss: float) -> None:
    """Offers `state` as the best checkpoint; kept only if its eval loss is the lowest so far."""
    if self.best is None or not np.isfinite(eval_loss):
      return
    self._finish()
    if step not in self.best.all_steps():
      self._start(self.best, step, state, meta, {"eval_loss": float(eval_loss)})

  def _start(self, mngr, step: int, state, meta, metrics=None) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    nbytes = _nbytes(state)
    try:
      mngr.save(step, args=args, metrics=metrics, force=True)
    except Exception as e:
      self._failed(e, mngr, step, nbytes)
      return
    self._pending.append((mngr, step, nbytes))
    if not self.async_save:
      self._finish()

  def _finish(self) -> None:
    """Waits for the saves in flight; seals what they committed. Raises DiskFullError."""
    while self._pending:
      mngr, step, nbytes = self._pending.pop(0)
      try:
        mngr.wait_until_finished()
        self._seal(mngr, step)
      except Exception as e:
        self._failed(e, mngr, step, nbytes)

  def _seal(self, mngr, step: int) -> None:
    """Writes the checksum manifest of a step this Checkpointer just committed."""
    step_dir = self._step_dir(mngr, step)
    # One process writes it (the directory is shared); only steps that were committed.
    if jax.process_index() != 0 or not os.path.isdir(step_dir) or checksums.is_sealed(step_dir):
      return
    checksums.seal(step_dir)

  def _failed(self, e: Exception, mngr, step: int, nbytes: int) -> None:
    """Re-raises a failed save: a full disk as one DiskFullError line (after removing the
    partial step); a best copy that cannot be written otherwise is only a warning."""
    if _disk_full(e):
      self._pending.clear()
      raise self._disk_full_error(mngr, step, nbytes) from None
    if mngr is not self.best or self.best is None:
      raise e
    self._pending = [p for p in self._pending if p[0] is not mngr]
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    warn(
      f"could not write the best checkpoint of step {step} to {mngr.directory} "
      f"({type(e).__name__}: {first[:200]}); best/ is not updated for the rest of this run"
    )
    self.best = None

  def _disk_full_error(self, mngr, step: int, nbytes: int) -> DiskFullError:
    directory = str(mngr.directory)
    if jax.process_index() == 0:  # The partial step is ours; removing it frees the space.
      for tmp in glob.glob(os.path.join(glob.escape(directory), f"{step}.orbax-checkpoint-tmp*")):
        shutil.rmtree(tmp, ignore_errors=True)
      for tmp in glob.glob(os.path.join(glob.escape(self._step_dir(mngr, step)), "*.tmp*")):
        with contextlib.suppress(OSError):
          os.remove(tmp)  # A manifest that did not fit.
    free = shutil.disk_usage(directory).free if os.path.isdir(directory) else 0
    latest = str(self.latest.directory)
    good = [int(n) for n in os.listdir(latest) if n.isdigit()] if os.path.isdir(latest) else []
    last = f"the checkpoint of step {max(good)} is intact" if good else "no checkpoint was saved"
    what = "best checkpoint" if mngr is self.best else "checkpoint"
    return DiskFullError(
      f"no space left on device writing the {what} of step {step} to {directory}: it needs about "
      f"{_size(nbytes)}, {_size(free)} free; {last}; free space (or lower checkpoint.keep / set "
      "checkpoint.keep_best=False) and rerun to resume"
    )

  # Reading.

  def _manager(self, best: bool):
    if best and self.best is None:
      raise ValueError("checkpoint.keep_best is off, so there is no best checkpoint")
    return self.best if best else self.latest

  @staticmethod
  def _step_dir(mngr, step: int) -> str:
    return os.path.join(str(mngr.directory), str(step))

  def _candidates(self, mngr, step: int | None) -> list[int]:
    steps = sorted(mngr.all_steps(), reverse=True)
    if step is not None:
      steps = [step] if step in steps else []
    if not steps:
      raise ValueError(
        f"no checkpoint{'' if step is None else f' at step {step}'} in {mngr.directory}"
      )
    return steps

  def read_meta(self, step: int | None = None, *, best: bool = False) -> dict[str, Any]:
    """The JSON metadata saved with a checkpoint (default: the newest intact one)."""
    mngr = self._manager(best)
    return self._first_intact(mngr, step, lambda s: self._read_meta(mngr, s))[0]

  def _read_meta(self, mngr, step: int) -> dict[str, Any]:
    path = os.path.join(self._step_dir(mngr, step), "meta")
    try:
      options = self._multiprocessing(f"{os.path.basename(str(mngr.directory))}_meta")
      with ocp.Checkpointer(ocp.JsonCheckpointHandler(), multiprocessing_options=options) as reader:
        return reader.restore(path)
    except Exception as e:
      raise _UnreadableError(
        f"checkpoint metadata {path} could not be read: {type(e).__name__}: {e}"
      ) from e

  def _first_intact(self, mngr, step: int | None, read: Callable[[int], Any]):
    """(read(s), s) for the newest step s (or `step`) whose checksums match and which reads.

    Damaged steps are skipped with a one-line warning each (a writer also deletes them: the
    resumed run writes them again); a given `step` is not replaced.
    """
    bad = []
    for s in self._candidates(mngr, step):
      where = self._step_dir(mngr, s)
      why = checksums.problem(where)
      if why is None:
        try:
          result = read(s)
        except _UnreadableError as e:
          why = str(e).splitlines()[0]
      if why is None:
        for b, b_where, b_why in bad:
          if self.read_only:
            warn(f"checkpoint {b_where} is damaged ({b_why}); using step {s}")
          else:  # The resumed run writes this step again.
            mngr.delete(b)
            warn(f"checkpoint {b_where} is damaged ({b_why}); removed it, resuming from step {s}")
        return result, s
      bad.append((s, where, why))
    raise ValueError(
      "no intact checkpoint: " + "; ".join(f"{where} ({why})" for _, where, why in bad)
    )

  def restore(
    self,
    target,
    *,
    step: int | None = None,
    best: bool = False,
    expected_meta: dict[str, Any] | None = None,
  ):
    """Restores into the structure, shapes, dtypes and shardings of `target`.

    Args:
      target: A pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings) to restore into, or
        a function of the checkpoint's meta returning one. Leaves without a sharding restore onto
        this process's first device (whatever the topology that wrote the checkpoint).
      step: Which step (default: the newest intact one, see the module docstring).
      best: Restore from `best/` instead of `checkpoints/`.
      expected_meta: If given, its "model" entry must equal the checkpoint's.

    Returns:
      (restored state, meta dict, step).

    Raises:
      ValueError: No (intact) checkpoint, a different model or mismatched shapes.
    """
    mngr = self._manager(best)

    def read(s):
      meta = self._read_meta(mngr, s)
      where = self._step_dir(mngr, s)
      if expected_meta is not None and meta.get("model") != expected_meta.get("model"):
        diffs = [
          f"{k}={meta.get('model', {}).get(k)!r} (checkpoint) vs {v!r} (config)"
          for k, v in expected_meta["model"].items()
          if meta.get("model", {}).get(k) != v
        ]
        raise ValueError(
          f"checkpoint {where} was written by a different model: {'; '.join(diffs[:3])}; "
          "use a fresh --workdir or the original model settings"
        )
      tree = target(meta) if callable(target) else target
      self._check_shapes(mngr, s, tree, where)
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device
        ),
        tree,
      )
      try:
        restored = mngr.restore(
          s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
      except Exception as e:  # Orbax raises many types for unreadable or partial files.
        raise _UnreadableError(f"{type(e).__name__}: {str(e).strip()[:200]}") from e
      return restored, meta

    (restored, meta), s = self._first_intact(mngr, step, read)
    return restored, meta, s

  def _check_shapes(self, mngr, step, target, where):
    try:
      saved = mngr.item_metadata(step)["state"]
    except Exception as e:
      raise _UnreadableError(f"{type(e).__name__}: {str(e).strip()[:200]}") from e
    if saved is None:
      return
    saved_flat = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
    saved_flat = {_path_str(p): v for p, v in saved_flat.items()}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
      key = _path_str(path)
      if key not in saved_flat:
        raise ValueError(f"checkpoint {where} has no entry {key}; it was written by another model")
      shape = tuple(getattr(saved_flat[key], "shape", ()) or ())
      if shape != tuple(leaf.shape):
        raise ValueError(
          f"checkpoint {where} holds {key} with shape {shape} but the model expects "
          f"{tuple(leaf.shape)}; it was written by a different model shape"
        )

  def wait(self):
    """Blocks until every save is written and sealed. Raises DiskFullError."""
    self._finish()

  def close(self):
    self._finish()
    self.latest.close()
    if self.best is not None:
      self.best.close()

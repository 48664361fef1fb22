"""Orbax checkpoints: the latest K by step, the best by eval loss, auto-resume, clear mismatches.

Layout under the workdir:
  checkpoints/<step>/{state, meta}   the most recent `keep` checkpoints (resume point)
  best/<step>/{state, meta}          the checkpoint with the lowest eval loss

`meta` is JSON: the resolved model config and the tokenizer, so evaluation and generation can
rebuild the model from the workdir alone and a checkpoint is never read into a different model.
"""

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


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


class Checkpointer:
  """Saves and restores `TrainState`-like pytrees with JSON metadata.

  Args:
    workdir: Run directory.
    keep: How many recent checkpoints to keep.
    keep_best: Also keep the lowest-eval-loss checkpoint under `workdir/best`.
    async_save: Write in a background thread (`wait()` blocks until written).
  """

  def __init__(
    self, workdir: str, *, keep: int = 3, keep_best: bool = True, async_save: bool = True
  ):
    self.workdir = os.path.abspath(workdir)
    opts = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    self.latest = ocp.CheckpointManager(
      os.path.join(self.workdir, "checkpoints"), item_handlers=_handlers(), options=opts
    )
    self.best = None
    if keep_best:
      best_opts = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda m: m["eval_loss"],
        best_mode="min",
        enable_async_checkpointing=async_save,
        create=True,
      )
      self.best = ocp.CheckpointManager(
        os.path.join(self.workdir, "best"), item_handlers=_handlers(), options=best_opts
      )

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Saves `state` at `step` unless that step is already saved."""
    if step not in self.latest.all_steps():
      self.latest.save(step, args=self._args(state, meta), force=True)

  def save_best(self, step: int, state, meta: dict[str, Any], eval_loss: float) -> None:
    """Offers `state` as the best checkpoint; kept only if its eval loss is the lowest so far."""
    if self.best is None or not np.isfinite(eval_loss) or step in self.best.all_steps():
      return
    self.best.save(
      step, args=self._args(state, meta), metrics={"eval_loss": float(eval_loss)}, force=True
    )

  @staticmethod
  def _args(state, meta):
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

  def read_meta(self, step: int | None = None, *, best: bool = False) -> dict[str, Any]:
    """The JSON metadata saved with a checkpoint (default: the latest)."""
    mngr = self._manager(best)
    step = self._step(mngr, step)
    path = os.path.join(mngr.directory, str(step), "meta")
    try:
      with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
        return reader.restore(path)
    except Exception as e:
      raise ValueError(
        f"checkpoint metadata {path} could not be read: {type(e).__name__}: {e}"
      ) from e

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
      target: A pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings) to restore into.
      step: Which step (default: the latest).
      best: Restore from `best/` instead of `checkpoints/`.
      expected_meta: If given, its "model" entry must equal the checkpoint's.

    Returns:
      (restored state, meta dict, step).

    Raises:
      ValueError: No checkpoint, a different model, mismatched shapes, or unreadable files.
    """
    mngr = self._manager(best)
    step = self._step(mngr, step)
    where = os.path.join(mngr.directory, str(step))
    meta = self.read_meta(step, best=best)
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
    self._check_shapes(mngr, step, target, where)
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      target,
    )
    try:
      restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
      )["state"]
    except Exception as e:  # Orbax raises many types for unreadable or partial files.
      raise ValueError(f"checkpoint {where} could not be read: {type(e).__name__}: {e}") from e
    return restored, meta, step

  def _check_shapes(self, mngr, step, target, where):
    try:
      saved = mngr.item_metadata(step)["state"]
    except Exception as e:
      raise ValueError(f"checkpoint {where} could not be read: {type(e).__name__}: {e}") from e
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

  def _manager(self, best: bool):
    if best and self.best is None:
      raise ValueError("checkpoint.keep_best is off, so there is no best checkpoint")
    return self.best if best else self.latest

  @staticmethod
  def _step(mngr, step):
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      raise ValueError(
        f"no checkpoint{'' if step is None else f' at step {step}'} in {mngr.directory}"
      )
    return step

  def wait(self):
    self.latest.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    if self.best is not None:
      self.best.close()

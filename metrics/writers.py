"""Metric writers: append-only JSONL plus TensorBoard event files, without TensorFlow.

Event files are written with the tensorboard package's own `EventFileWriter` and protos, so
TensorBoard reads them natively. In multi-host runs construct the writer with
`enabled=(jax.process_index() == 0)`; a disabled writer touches no files.
"""

import json
import math
import os
import time
from typing import Any

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.summary.writer import event_file_writer

_RESERVED_KEYS = ("step", "time")


def _scalar(value: Any) -> float:
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"Expected a scalar, got shape {arr.shape}.")
  return float(arr.reshape(()))


class MetricWriter:
  """Writes scalars (and optionally text) to `logdir` as JSONL and TensorBoard events.

  The JSONL file holds one object per `write_scalars` call, `{"step", "time", **scalars}`, and is
  opened in append mode so a resumed run continues the same file. Non-finite values are written as
  null to keep every line valid JSON. Text goes to a separate `text.jsonl` so the scalar log stays
  purely numeric.
  """

  def __init__(
    self,
    logdir: str | os.PathLike,
    *,
    jsonl_name: str = "metrics.jsonl",
    tensorboard: bool = True,
    enabled: bool = True,
  ):
    """Opens the writer.

    Args:
      logdir: Output directory (created if missing).
      jsonl_name: File name of the JSONL log inside `logdir`.
      tensorboard: Whether to also write TensorBoard event files.
      enabled: When False (non-zero processes), every method is a no-op.
    """
    self.logdir = os.fspath(logdir)
    self.jsonl_path = os.path.join(self.logdir, jsonl_name)
    self.enabled = enabled
    self._jsonl = None
    self._text = None
    self._events = None
    self._closed = False
    if not enabled:
      return
    os.makedirs(self.logdir, exist_ok=True)
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close().
    if tensorboard:
      self._events = event_file_writer.EventFileWriter(self.logdir)

  def _check_open(self) -> bool:
    """Returns whether to write; raises if an enabled writer was closed."""
    if not self.enabled:
      return False
    if self._closed:
      raise RuntimeError("MetricWriter is closed.")
    return True

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    """Writes one record of scalar metrics at `step`.

    Args:
      step: Training step.
      scalars: Metric name to scalar (Python number, numpy or jax scalar).
    """
    if not self._check_open():
      return
    clash = [k for k in _RESERVED_KEYS if k in scalars]
    if clash:
      raise ValueError(f"Metric names {clash} are reserved.")
    now = time.time()
    values = {k: _scalar(v) for k, v in scalars.items()}
    record = {"step": int(step), "time": now}
    record.update({k: v if math.isfinite(v) else None for k, v in values.items()})
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    if self._events is not None:
      summary = summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
      )
      self._events.add_event(event_pb2.Event(wall_time=now, step=int(step), summary=summary))

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Writes a text summary (TensorBoard "text" plugin) and a `text.jsonl` record.

    Args:
      step: Training step.
      tag: Summary tag.
      text: Text (markdown in TensorBoard).
    """
    if not self._check_open():
      return
    now = time.time()
    if self._text is None:
      text_path = os.path.join(self.logdir, "text.jsonl")
      self._text = open(text_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close().
    self._text.write(json.dumps({"step": int(step), "time": now, "tag": tag, "text": text}) + "\n")
    self._text.flush()
    if self._events is not None:
      tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        string_val=[text.encode("utf-8")],
      )
      metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
      )
      value = summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
      event = event_pb2.Event(
        wall_time=now, step=int(step), summary=summary_pb2.Summary(value=[value])
      )
      self._events.add_event(event)

  def flush(self) -> None:
    """Flushes buffered records to disk."""
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._text is not None:
      self._text.flush()
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    """Flushes and closes all files; further writes are an error. Idempotent."""
    self._closed = True
    for f in (self._jsonl, self._text):
      if f is not None:
        f.close()
    self._jsonl = self._text = None
    if self._events is not None:
      self._events.close()
      self._events = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

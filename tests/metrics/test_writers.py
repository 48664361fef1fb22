"""Tests for MetricWriter: JSONL and TensorBoard round trips, appends, and disabled writers."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from reslm.metrics import writers

# Values exactly representable in float32, since TensorBoard stores float32.
LOSSES = [2.5, 1.25, 0.75, 0.5, 0.375]


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_jsonl_and_tensorboard_round_trip(tmp_path):
  logdir = tmp_path / "run"
  with writers.MetricWriter(logdir) as w:
    for step, loss in enumerate(LOSSES):
      w.write_scalars(step * 10, {"loss": loss, "lr": np.float32(0.25), "acc": jnp.asarray(0.5)})
    w.write_text(50, "config", "hello")

  records = _read_jsonl(logdir / "metrics.jsonl")
  assert [r["step"] for r in records] == [0, 10, 20, 30, 40]
  assert [r["loss"] for r in records] == LOSSES
  assert all(r["lr"] == 0.25 and r["acc"] == 0.5 and r["time"] > 0 for r in records)
  assert set(records[0]) == {"step", "time", "loss", "lr", "acc"}

  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == {"loss", "lr", "acc"}
  events = acc.Scalars("loss")
  assert [e.step for e in events] == [0, 10, 20, 30, 40]
  assert [e.value for e in events] == LOSSES
  assert [e.value for e in acc.Scalars("lr")] == [0.25] * 5
  text = acc.Tensors("config")
  assert [t.step for t in text] == [50]
  assert text[0].tensor_proto.string_val == [b"hello"]


def test_resumed_run_appends_and_nan_is_null(tmp_path):
  with writers.MetricWriter(tmp_path, tensorboard=False) as w:
    w.write_scalars(1, {"loss": 1.0})
  with writers.MetricWriter(tmp_path, tensorboard=False) as w:
    w.write_scalars(2, {"loss": float("nan")})
  records = _read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, None)]
  assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_disabled_writes_nothing(tmp_path):
  logdir = tmp_path / "run"
  w = writers.MetricWriter(logdir, enabled=False)
  w.write_scalars(0, {"loss": 1.0})
  w.write_text(0, "t", "x")
  w.flush()
  w.close()
  w.write_scalars(1, {"loss": 1.0})
  assert not logdir.exists()
  assert list(tmp_path.iterdir()) == []


def test_reserved_key_and_closed_writer(tmp_path):
  w = writers.MetricWriter(tmp_path, tensorboard=False)
  with pytest.raises(ValueError):
    w.write_scalars(0, {"step": 1.0})
  w.close()
  w.close()
  with pytest.raises(RuntimeError):
    w.write_scalars(0, {"loss": 1.0})

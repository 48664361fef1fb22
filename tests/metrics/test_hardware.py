"""Tests for the matmul peak, process memory and host description."""

import json
import math

import jax.numpy as jnp

from reslm.metrics import hardware


def test_matmul_peak_positive_finite():
  out = hardware.measure_matmul_peak(jnp.float32, size=256, repeats=3)
  assert math.isfinite(out["flops_per_second"]) and out["flops_per_second"] > 0
  assert out["dtype"] == "float32"
  assert out["size"] == 256
  assert isinstance(out["device_kind"], str)


def test_process_memory():
  mem = hardware.process_memory()
  assert mem["rss_bytes"] > 0
  assert mem["peak_rss_bytes"] >= mem["rss_bytes"]


def test_host_info_jsonable():
  info = hardware.host_info()
  assert info["device_count"] >= 1
  assert info["jax_backend"] == "cpu"
  assert info["usable_cores"] >= 1
  json.dumps(info)

"""Tests for the efficiency report: arithmetic, missing inputs, formatting and JSON output."""

import json
import math

import jax
import jax.numpy as jnp
import pytest

from reslm.metrics import energy, flops, report

SECTIONS = (
  "params",
  "flops",
  "time",
  "throughput",
  "mfu",
  "memory",
  "energy",
  "carbon",
  "cost",
  "host",
  "extra",
)


MODEL_FLOPS = {
  "forward_per_token": 1000.0,
  "train_per_token": 3000.0,
  "matmul_params": 400,
  "source": "counted",
  "uncounted": [],
}


def _compiled():
  f = jax.jit(lambda a: jnp.tanh(a @ a))
  return f.lower(jnp.ones((32, 32))).compile()


def _report(**overrides):
  kwargs = dict(
    params_total=1_000_000,
    params_trainable=900_000,
    params_active_per_token=500,
    model_flops=MODEL_FLOPS,
    compiled=_compiled(),
    tokens_per_step=1024,
    steps_timed=4,
    compile_seconds=1.5,
    step_seconds=[0.5, 0.5, 0.5, 1.0],
    total_wall_seconds=7200.0,
    energy=energy.EnergyReading(joules=1.8e6, seconds=7200.0, source="rapl", is_estimate=False),
    peak_flops_per_second=1e7,
    cfg=report.get_default_config(),
    extra={"run": "test"},
  )
  kwargs.update(overrides)
  return report.build_report(**kwargs)


def test_defaults():
  cfg = report.get_default_config()
  assert cfg.grid_intensity_g_per_kwh == 400
  assert cfg.usd_per_hour == 0.10 and cfg.usd_per_kwh == 0.15
  assert cfg.measure_peak and cfg.peak_matmul_size == 1024


def test_arithmetic():
  r = _report()
  assert tuple(r) == SECTIONS
  assert r["params"] == {
    "total": 1_000_000,
    "trainable": 900_000,
    "active_per_token": 500,
    "matmul_per_token": 400,
  }
  # 1.8 MJ = 0.5 kWh over 2 h of wall time.
  assert r["energy"]["kwh"] == 0.5
  assert r["energy"]["source"] == "rapl" and r["energy"]["is_estimate"] is False
  assert r["carbon"]["g_co2e"] == 0.5 * 400
  assert r["cost"]["usd"] == 2 * 0.10 + 0.5 * 0.15
  assert r["cost"]["usd_per_param"] == (2 * 0.10 + 0.5 * 0.15) / 1_000_000
  assert r["time"]["step_median_s"] == 0.5
  # Linear interpolation at rank 0.9 × 3 = 2.7, between 0.5 and 1.0.
  assert r["time"]["step_p90_s"] == pytest.approx(0.5 + 0.7 * 0.5)
  assert r["throughput"]["train_tokens_per_s"] == 1024 / 0.5
  assert r["mfu"]["achieved_flops_per_s"] == 3000.0 * 2048
  assert r["mfu"]["peak_flops_per_s"] == 1e7
  assert r["mfu"]["mfu"] == 3000.0 * 2048 / 1e7
  assert r["mfu"]["flops_source"] == "counted"
  assert r["flops"]["train_per_token"] == 3000.0 and r["flops"]["forward_per_token"] == 1000.0
  # 6·N over the matmul parameters, not the active ones (which include the embedding table).
  assert r["flops"]["six_n_train_per_token"] == 6 * 400
  xla = flops.xla_cost(_compiled())["flops"]
  assert r["flops"]["xla_flops_per_step"] == xla
  assert r["flops"]["xla_flops_per_token"] == xla / 1024
  assert "once" in r["flops"]["xla_note"]
  assert r["memory"]["peak_bytes"] >= r["memory"]["temp_bytes"]
  assert r["memory"]["rss_bytes"] > 0
  assert r["extra"] == {"run": "test"}


def test_missing_inputs_give_none():
  r = report.build_report(
    params_total=None,
    params_trainable=None,
    params_active_per_token=None,
    model_flops=None,
    compiled=None,
    tokens_per_step=None,
    steps_timed=None,
    compile_seconds=None,
    step_seconds=[],
    total_wall_seconds=None,
    energy=None,
    peak_flops_per_second=None,
    cfg=None,
  )
  assert tuple(r) == SECTIONS
  assert r["mfu"]["mfu"] is None and r["mfu"]["flops_source"] is None
  assert r["flops"]["six_n_train_per_token"] is None
  assert r["cost"]["usd"] is None and r["carbon"]["g_co2e"] is None
  assert r["memory"]["peak_bytes"] is None
  assert r["time"]["step_median_s"] is None
  report.format_report(r)
  json.dumps(r)


def test_format_report_sections_and_estimate_mark():
  est = energy.EnergyReading(10.0, 1.0, energy.ESTIMATE_SOURCE, True)
  text = report.format_report(_report(energy=est))
  for section in SECTIONS:
    assert f"[{section}]" in text
  assert "(estimate)" in text
  assert "tok/s" in text and "FLOP/s" in text and "ms" in text and "$" in text
  assert "MiB" in text or "KiB" in text
  assert "(estimate)" not in report.format_report(_report())


def test_write_report_round_trip_nan_to_null(tmp_path):
  r = _report(extra={"nan": float("nan"), "inf": math.inf, "ok": 1.5, "n": [1, float("nan")]})
  path = tmp_path / "sub" / "report.json"
  report.write_report(r, path)
  text = path.read_text()
  loaded = json.loads(text)
  assert loaded["extra"] == {"nan": None, "inf": None, "ok": 1.5, "n": [1, None]}
  assert loaded["cost"]["usd"] == r["cost"]["usd"]
  assert loaded["params"] == r["params"]
  assert "NaN" not in text and "Infinity" not in text
  assert list(loaded) == sorted(loaded)


def test_mfu_labels_its_flops_source():
  incomplete = _report(model_flops={**MODEL_FLOPS, "uncounted": ["while (body counted once)"]})
  assert incomplete["mfu"]["flops_source"] == "counted (incomplete: while (body counted once))"
  # Without a model count, MFU falls back to XLA's count of the step, labelled as an undercount.
  fallback = _report(model_flops=None)
  xla = flops.xla_cost(_compiled())["flops"]
  assert fallback["mfu"]["achieved_flops_per_s"] == xla / 1024 * 2048
  assert fallback["mfu"]["flops_source"] == report.XLA_SOURCE
  assert "once" in report.XLA_SOURCE

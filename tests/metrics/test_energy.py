"""Tests for the RAPL energy meter (against a fake powercap tree) and its estimate fallback."""

import os
import time

import pytest

from reslm.metrics import energy

MAX_RANGE = 1_000_000


def _zone(root, name, energy_uj, max_range=MAX_RANGE):
  path = os.path.join(root, name)
  os.makedirs(path, exist_ok=True)
  _set(root, name, energy_uj)
  with open(os.path.join(path, "max_energy_range_uj"), "w") as f:
    f.write(f"{max_range}\n")


def _set(root, name, energy_uj):
  with open(os.path.join(root, name, "energy_uj"), "w") as f:
    f.write(f"{energy_uj}\n")


@pytest.fixture
def rapl_root(tmp_path):
  root = str(tmp_path / "powercap")
  _zone(root, "intel-rapl:0", 1_000)
  _zone(root, "intel-rapl:1", 999_000)
  # Sub-zones are part of their package and must not be added again.
  _zone(root, "intel-rapl:0:0", 5)
  os.makedirs(os.path.join(root, "dtpm"))
  return root


def test_rapl_two_packages_with_wraparound(rapl_root):
  meter = energy.EnergyMeter(powercap_root=rapl_root)
  assert meter.source == "rapl"
  meter.start()
  _set(rapl_root, "intel-rapl:0", 5_000)  # +4000 µJ.
  _set(rapl_root, "intel-rapl:1", 2_000)  # Wrapped: (1_000_000 - 999_000) + 2_000 = +3000 µJ.
  _set(rapl_root, "intel-rapl:0:0", 900_000)
  reading = meter.stop()
  assert reading.joules == 0.007
  assert reading.source == "rapl"
  assert not reading.is_estimate
  assert reading.seconds >= 0
  assert meter.reading is reading


def test_context_manager(rapl_root):
  with energy.EnergyMeter(powercap_root=rapl_root) as meter:
    _set(rapl_root, "intel-rapl:0", 3_000)
  assert meter.reading.joules == 2_000 / 1e6


def test_estimate_when_no_rapl(tmp_path):
  meter = energy.EnergyMeter(powercap_root=str(tmp_path / "missing"), watts=20.0, cores=2)
  with meter:
    end = time.process_time() + 0.05
    while time.process_time() < end:
      pass
  reading = meter.reading
  assert reading.is_estimate
  assert reading.source == energy.ESTIMATE_SOURCE
  assert "estimate" in reading.source
  # Busy-looping one thread of two cores: utilisation about 1/2, never above 1.
  assert 0 < reading.joules <= 20.0 * reading.seconds
  assert reading.kwh == reading.joules / 3.6e6


def test_default_watts_from_per_core():
  meter = energy.EnergyMeter(powercap_root="/nonexistent", cpu_watts_per_core=7.0, cores=3)
  assert meter._watts == 21.0


def test_stop_before_start():
  with pytest.raises(RuntimeError):
    energy.EnergyMeter(powercap_root="/nonexistent").stop()

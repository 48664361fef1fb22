"""Energy measurement: Intel RAPL package counters when readable, else a labelled estimate.

RAPL (`/sys/class/powercap/intel-rapl:N/energy_uj`) measures whole CPU packages, i.e. every process
on the socket, in microjoules. Recent kernels make `energy_uj` root-only; when it is missing or
unreadable the meter falls back to `watts × elapsed × utilisation`, where utilisation is this
process's CPU time over the wall-clock time of all usable cores. That is an estimate, and readings
say so (`is_estimate=True`).
"""

import dataclasses
import os
import re
import time

from reslm.metrics import hardware

ESTIMATE_SOURCE = "estimate (TDP × utilisation)"
RAPL_SOURCE = "rapl"
DEFAULT_CPU_WATTS_PER_CORE = 10.0

# Top-level package zones only ("intel-rapl:0"); sub-zones ("intel-rapl:0:0", core/uncore/dram)
# are already included in their package's counter.
_PACKAGE_RE = re.compile(r"^intel-rapl:\d+$")


@dataclasses.dataclass(frozen=True)
class EnergyReading:
  """Energy used over one measured interval.

  Attributes:
    joules: Energy in joules.
    seconds: Wall-clock duration of the interval.
    source: "rapl" when measured, otherwise `ESTIMATE_SOURCE`.
    is_estimate: True when the figure is not a hardware measurement.
  """

  joules: float
  seconds: float
  source: str
  is_estimate: bool

  @property
  def kwh(self) -> float:
    return self.joules / 3.6e6


def _read_int(path: str) -> int:
  with open(path, encoding="ascii") as f:
    return int(f.read().strip())


class EnergyMeter:
  """Measures energy between `start()` and `stop()`; also usable as a context manager.

  Example:
    meter = EnergyMeter()
    meter.start()
    run()
    reading = meter.stop()

    with EnergyMeter() as meter:
      run()
    reading = meter.reading
  """

  def __init__(
    self,
    *,
    powercap_root: str = "/sys/class/powercap",
    watts: float | None = None,
    cpu_watts_per_core: float = DEFAULT_CPU_WATTS_PER_CORE,
    cores: int | None = None,
  ):
    """Initialises the meter.

    Args:
      powercap_root: Directory holding the `intel-rapl:*` zones (a fake tree in tests).
      watts: Power at full utilisation for the estimate; defaults to
        `cpu_watts_per_core × cores`.
      cpu_watts_per_core: Per-core TDP share used for the default `watts`.
      cores: Cores the utilisation is normalised by; defaults to the usable cores.
    """
    self._root = powercap_root
    self._cores = cores or hardware.usable_cores()
    self._watts = watts if watts is not None else cpu_watts_per_core * self._cores
    self._zones = self._readable_zones()
    self._start: tuple[float, float, dict[str, int]] | None = None
    self.reading: EnergyReading | None = None

  @property
  def source(self) -> str:
    """The source this meter will report: "rapl" or the estimate label."""
    return RAPL_SOURCE if self._zones else ESTIMATE_SOURCE

  def _readable_zones(self) -> list[str]:
    try:
      names = sorted(os.listdir(self._root))
    except OSError:
      return []
    zones = []
    for name in names:
      zone = os.path.join(self._root, name)
      if not _PACKAGE_RE.match(name):
        continue
      try:
        _read_int(os.path.join(zone, "energy_uj"))
        _read_int(os.path.join(zone, "max_energy_range_uj"))
      except (OSError, ValueError):
        # Usually PermissionError: energy_uj is root-only on patched kernels.
        continue
      zones.append(zone)
    return zones

  def _read_counters(self) -> dict[str, int]:
    return {zone: _read_int(os.path.join(zone, "energy_uj")) for zone in self._zones}

  def start(self) -> "EnergyMeter":
    """Starts (or restarts) the interval."""
    self.reading = None
    counters = self._read_counters()
    self._start = (time.perf_counter(), time.process_time(), counters)
    return self

  def stop(self) -> EnergyReading:
    """Ends the interval and returns its `EnergyReading` (also kept in `self.reading`)."""
    if self._start is None:
      raise RuntimeError("EnergyMeter.stop() called before start().")
    counters = self._read_counters()
    wall0, cpu0, counters0 = self._start
    seconds = time.perf_counter() - wall0
    cpu_seconds = time.process_time() - cpu0
    self._start = None
    if self._zones:
      micro = 0
      for zone in self._zones:
        delta = counters[zone] - counters0[zone]
        if delta < 0:
          # The counter wrapped past max_energy_range_uj once (more wraps are undetectable, but
          # take minutes to hours at package power).
          delta += _read_int(os.path.join(zone, "max_energy_range_uj"))
        micro += delta
      reading = EnergyReading(micro / 1e6, seconds, RAPL_SOURCE, False)
    else:
      utilisation = cpu_seconds / (seconds * self._cores) if seconds > 0 else 0.0
      utilisation = min(max(utilisation, 0.0), 1.0)
      reading = EnergyReading(self._watts * seconds * utilisation, seconds, ESTIMATE_SOURCE, True)
    self.reading = reading
    return reading

  def __enter__(self) -> "EnergyMeter":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

"""The efficiency report every run and benchmark emits (survey arXiv 2401.00625, §9).

`build_report` gathers parameters, FLOPs, time, throughput, MFU, memory, energy, carbon and cost
into one JSON-able dict; `format_report` renders it as a table and `write_report` saves it. Any
missing input yields None for the figures that depend on it rather than an error.
"""

import json
import math
import os
import statistics
from typing import Any

import ml_collections
import numpy as np

from reslm.metrics import energy as energy_lib
from reslm.metrics import flops as flops_lib
from reslm.metrics import hardware

XLA_FLOPS_NOTE = (
  "XLA cost_analysis of the compiled step counts each while-loop body once: scanned layers, "
  "chunked recurrences, blocked attention and microbatch loops are undercounted."
)
XLA_SOURCE = "xla cost_analysis, while-loop bodies counted once (an undercount)"
PEAK_SOURCE = "measured square-matmul peak (same run, same device)"
ESTIMATE_MARK = " (estimate)"


def get_default_config() -> ml_collections.ConfigDict:
  """Returns the `report` config section.

  Fields:
    grid_intensity_g_per_kwh: Grid carbon intensity in gCO2e/kWh. 400 is roughly the world
      average; set it for the region the job runs in (e.g. ~50 for hydro/nuclear grids, ~700 for
      coal-heavy ones).
    usd_per_hour: Machine rental price (default: a 2-vCPU cloud VM).
    usd_per_kwh: Electricity price, for the energy part of the cost.
    cpu_watts_per_core: Per-core TDP share for the energy estimate when RAPL is unavailable.
    measure_peak: Whether runs measure the matmul peak used as the MFU denominator.
    peak_matmul_size: Side of the square matmul used for that measurement.
  """
  cfg = ml_collections.ConfigDict()
  cfg.grid_intensity_g_per_kwh = 400.0
  cfg.usd_per_hour = 0.10
  cfg.usd_per_kwh = 0.15
  cfg.cpu_watts_per_core = energy_lib.DEFAULT_CPU_WATTS_PER_CORE
  cfg.measure_peak = True
  cfg.peak_matmul_size = 1024
  return cfg


def _num(x: Any) -> float | None:
  """Converts to a finite float, or None."""
  if x is None:
    return None
  try:
    x = float(x)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


def _mul(*xs: Any) -> float | None:
  vals = [_num(x) for x in xs]
  return None if any(v is None for v in vals) else math.prod(vals)


def _div(a: Any, b: Any) -> float | None:
  a, b = _num(a), _num(b)
  return None if a is None or b is None or b == 0 else a / b


def _add(*xs: Any) -> float | None:
  vals = [_num(x) for x in xs]
  return None if any(v is None for v in vals) else sum(vals)


def _int(x: Any) -> int | None:
  return None if _num(x) is None else int(x)


def _step_stats(step_seconds: Any) -> tuple[float | None, float | None]:
  steps = [s for s in (_num(x) for x in (step_seconds or [])) if s is not None]
  if not steps:
    return None, None
  return float(statistics.median(steps)), float(np.percentile(steps, 90))


def build_report(
  *,
  params_total: int | None,
  params_trainable: int | None,
  params_active_per_token: int | None,
  model_flops: dict | None,
  compiled: Any,
  tokens_per_step: int | None,
  steps_timed: int | None,
  compile_seconds: float | None,
  step_seconds: list[float] | None,
  total_wall_seconds: float | None,
  energy: energy_lib.EnergyReading | None,
  peak_flops_per_second: float | None,
  cfg: ml_collections.ConfigDict | None,
  extra: dict | None = None,
) -> dict[str, Any]:
  """Builds the efficiency report.

  Args:
    params_total: All parameters.
    params_trainable: Parameters updated by the optimiser.
    params_active_per_token: Parameters used per token (differs from total for MoE / sparsity).
    model_flops: Model FLOPs per token, e.g. from `training.flops.model_flops`: a dict with
      `forward_per_token`, `train_per_token` (the MFU numerator), `source` (how they were
      obtained), optionally `uncounted` (work the count missed) and `matmul_params` (parameters
      entering a matmul per token, the N of 6·N). None: MFU falls back to XLA's loop-once count,
      labelled as such.
    compiled: The compiled train step (`jax.stages.Compiled`), or None.
    tokens_per_step: Tokens processed per train step (global batch × sequence length).
    steps_timed: Number of steps in `step_seconds`.
    compile_seconds: Time to lower and compile the train step.
    step_seconds: Wall seconds of each timed step, after warm-up.
    total_wall_seconds: Wall time of the whole run (used for the machine cost).
    energy: Energy reading over the run, or None.
    peak_flops_per_second: Matmul peak measured in this run (MFU denominator), or None.
    cfg: The `report` config section; defaults to `get_default_config()`.
    extra: Free-form JSON-able entries passed through under `extra`.

  Returns:
    A dict of sections: params, flops, time, throughput, mfu, memory, energy, carbon, cost, host,
    extra. Figures whose inputs are missing are None.
  """
  cfg = cfg if cfg is not None else get_default_config()
  model = model_flops or {}
  xla = flops_lib.xla_cost(compiled)
  median_s, p90_s = _step_stats(step_seconds)
  tokens_per_s = _div(tokens_per_step, median_s)

  xla_per_token = _div(xla["flops"], tokens_per_step)
  train_per_token = _num(model.get("train_per_token"))
  uncounted = list(model.get("uncounted") or [])
  flops_source = model.get("source")
  if flops_source and uncounted:
    flops_source += " (incomplete: " + ", ".join(uncounted) + ")"
  if train_per_token is None:
    train_per_token = xla_per_token
    flops_source = XLA_SOURCE if xla_per_token is not None else None
  matmul_params = _int(model.get("matmul_params"))
  achieved = _mul(train_per_token, tokens_per_s)
  peak = _num(peak_flops_per_second)

  joules = _num(energy.joules) if energy is not None else None
  kwh = _div(joules, 3.6e6)
  is_estimate = energy.is_estimate if energy is not None else None
  usd_compute = _mul(_div(total_wall_seconds, 3600.0), cfg.usd_per_hour)
  usd_energy = _mul(kwh, cfg.usd_per_kwh)
  usd = _add(usd_compute, usd_energy)

  return {
    "params": {
      "total": _int(params_total),
      "trainable": _int(params_trainable),
      "active_per_token": _int(params_active_per_token),
      "matmul_per_token": matmul_params,
    },
    "flops": {
      "forward_per_token": _num(model.get("forward_per_token")),
      "train_per_token": _num(model.get("train_per_token")),
      "source": model.get("source"),
      "uncounted": uncounted,
      "six_n_train_per_token": (
        flops_lib.six_n_flops_per_token(matmul_params) if matmul_params is not None else None
      ),
      "xla_flops_per_step": xla["flops"],
      "xla_flops_per_token": xla_per_token,
      "xla_bytes_accessed_per_step": xla["bytes_accessed"],
      "xla_note": XLA_FLOPS_NOTE,
    },
    "time": {
      "compile_s": _num(compile_seconds),
      "step_median_s": median_s,
      "step_p90_s": p90_s,
      "total_wall_s": _num(total_wall_seconds),
      "steps_timed": _int(steps_timed),
    },
    "throughput": {
      "train_tokens_per_s": tokens_per_s,
      "steps_per_s": _div(1.0, median_s),
    },
    "mfu": {
      "achieved_flops_per_s": achieved,
      "peak_flops_per_s": peak,
      "mfu": _div(achieved, peak),
      "flops_source": flops_source,
      "peak_source": PEAK_SOURCE if peak is not None else None,
    },
    "memory": {**flops_lib.memory_analysis(compiled), **hardware.process_memory()},
    "energy": {
      "joules": joules,
      "kwh": kwh,
      "seconds": _num(energy.seconds) if energy is not None else None,
      "source": energy.source if energy is not None else None,
      "is_estimate": is_estimate,
    },
    "carbon": {
      "g_co2e": _mul(kwh, cfg.grid_intensity_g_per_kwh),
      "grid_intensity_g_per_kwh": _num(cfg.grid_intensity_g_per_kwh),
      "is_estimate": is_estimate,
    },
    "cost": {
      "usd": usd,
      "usd_compute": usd_compute,
      "usd_energy": usd_energy,
      "usd_per_param": _div(usd, params_total),
      "usd_per_hour": _num(cfg.usd_per_hour),
      "usd_per_kwh": _num(cfg.usd_per_kwh),
    },
    "host": hardware.host_info(),
    "extra": dict(extra) if extra else {},
  }


_SECTION_ORDER = (
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
# Figures derived from the energy reading, marked when that reading is an estimate.
_ENERGY_DERIVED = {"joules", "kwh", "g_co2e", "usd", "usd_energy", "usd_per_param"}


def _si(x: float, unit: str) -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.4g} {prefix}{unit}".rstrip()
  return f"{x:.4g} {unit}".rstrip()


def _bytes(x: float) -> str:
  for scale, prefix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
    if abs(x) >= scale:
      return f"{x / scale:.2f} {prefix}"
  return f"{int(x)} B"


def _seconds(x: float) -> str:
  if abs(x) < 1e-3:
    return f"{x * 1e6:.3g} µs"
  if abs(x) < 1:
    return f"{x * 1e3:.3g} ms"
  if abs(x) < 60:
    return f"{x:.3g} s"
  if abs(x) < 3600:
    return f"{x / 60:.3g} min"
  return f"{x / 3600:.3g} h"


def _usd(x: float) -> str:
  return f"${x:.3e}" if 0 < abs(x) < 0.01 else f"${x:.4f}"


def _format_value(section: str, key: str, value: Any) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)):
    return ", ".join(str(v) for v in value) or "none"
  if isinstance(value, dict):
    return json.dumps(value, sort_keys=True, default=str)
  if not isinstance(value, (int, float)) or not math.isfinite(value):
    return str(value)
  if key.endswith("_bytes") or key.endswith("_bytes_accessed_per_step"):
    return _bytes(value)
  # Rates before durations: both end in "_s".
  if key.endswith("flops_per_s"):
    return _si(value, "FLOP/s")
  if key.endswith("tokens_per_s"):
    return _si(value, "tok/s")
  if key.endswith("_per_s"):
    return f"{value:.4g} /s"
  if key.endswith("_s") or key == "seconds":
    return _seconds(value)
  if key == "mfu":
    return f"{100 * value:.2f} %"
  if "flops" in key or section == "flops":
    return _si(value, "FLOP")
  if key == "joules":
    return _si(value, "J")
  if key == "kwh":
    return f"{value:.3g} kWh"
  if key == "g_co2e":
    return f"{value:.3g} g"
  if key == "grid_intensity_g_per_kwh":
    return f"{value:g} g/kWh"
  if key == "usd_per_param":
    return f"${value:.3e}"
  if key.startswith("usd"):
    return _usd(value)
  if section == "params":
    return _si(value, "")
  if isinstance(value, int):
    return f"{value:,}"
  return f"{value:.4g}"


def format_report(report: dict[str, Any]) -> str:
  """Renders a report as an aligned two-column table grouped by section.

  Args:
    report: A dict from `build_report`.

  Returns:
    The table as a string; energy-derived figures carry "(estimate)" when estimated.
  """
  is_estimate = bool((report.get("energy") or {}).get("is_estimate"))
  sections = [s for s in _SECTION_ORDER if s in report]
  sections += sorted(s for s in report if s not in _SECTION_ORDER)
  rows: list[tuple[str, str] | str] = []
  for section in sections:
    body = report[section]
    if not isinstance(body, dict):
      rows.append((section, _format_value("", section, body)))
      continue
    rows.append(f"[{section}]")
    for key, value in body.items():
      text = _format_value(section, key, value)
      if is_estimate and key in _ENERGY_DERIVED and value is not None:
        text += ESTIMATE_MARK
      rows.append((f"  {key}", text))
  width = max((len(r[0]) for r in rows if isinstance(r, tuple)), default=0) + 2
  lines = [r if isinstance(r, str) else f"{r[0]:<{width}}{r[1]}" for r in rows]
  return "\n".join(lines)


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if x is None or isinstance(x, str):
    return x
  return str(x)


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
  """Writes a report as JSON (indent 2, sorted keys, non-finite floats as null).

  Args:
    report: A dict from `build_report` (any JSON-able nesting).
    path: Destination file; parent directories are created.
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(_jsonable(report), f, indent=2, sort_keys=True, allow_nan=False)
    f.write("\n")
  # Atomic replace: a reader never sees a half-written report.
  os.replace(tmp, path)

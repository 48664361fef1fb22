"""Efficiency metrics (survey arXiv 2401.00625, §9): parameters, FLOPs, MFU, memory, energy,
carbon and cost, plus JSONL / TensorBoard metric writers."""

from reslm.metrics.energy import EnergyMeter, EnergyReading
from reslm.metrics.flops import (
  memory_analysis,
  six_n_flops_per_token,
  transformer_flops_per_token,
  xla_cost,
)
from reslm.metrics.hardware import host_info, measure_matmul_peak, process_memory
from reslm.metrics.params import count_params, param_bytes
from reslm.metrics.pareto import pareto_front
from reslm.metrics.report import build_report, format_report, get_default_config, write_report
from reslm.metrics.writers import MetricWriter

__all__ = [
  "EnergyMeter",
  "EnergyReading",
  "MetricWriter",
  "build_report",
  "count_params",
  "format_report",
  "get_default_config",
  "host_info",
  "measure_matmul_peak",
  "memory_analysis",
  "param_bytes",
  "pareto_front",
  "process_memory",
  "six_n_flops_per_token",
  "transformer_flops_per_token",
  "write_report",
  "xla_cost",
]

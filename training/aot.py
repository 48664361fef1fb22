"""Compile the real train step for a TPU slice on this machine, without a TPU (`--compile_only`).

Memory comes from the real program (scanned layers, accumulation and multi-step loops as
configured). XLA counts a while-loop body once, so the time and FLOP estimates come from
loop-free variants instead: layers unrolled, one step per call, no accumulation loop, windowed
(collective-matmul) einsums off, compiled at one and two layer groups and extrapolated linearly
to the full depth (research/tpu_aot.md measured flops exactly linear, time within 2%).
"""

import dataclasses
from typing import Any

import jax

from reslm import data as data_lib
from reslm.parallel import aot
from reslm.parallel import comm as comm_lib
from reslm.parallel import mesh as mesh_lib
from reslm.training import config as config_lib
from reslm.training import flops as flops_lib
from reslm.training import loop

# Loop-free variants for cost estimates: no windowed-einsum loops either.
_TPU_ESTIMATE_OPTIONS = {
  "xla_tpu_enable_windowed_einsum_for_all_gather": False,
  "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def _example_batch(cfg):
  """A global batch (for keys, shapes and dtypes) and the data's vocabulary size."""
  dataset = data_lib.build_dataset(cfg.data)
  return dataset.train_batch(0), dataset.vocab_size


def compile_step(model_cfg, train_cfg, parallel_cfg, mesh, example: dict, options=None):
  """Traces, lowers and compiles the train step from shapes only; returns the Compiled."""
  place = loop.placement(model_cfg, train_cfg, parallel_cfg, mesh)
  graphdef, _, tx = loop.abstract_state(model_cfg, train_cfg)
  step_fn, _ = loop.jit_steps(graphdef, tx, place, train_cfg)
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), place.abstract, place.state
  )
  k = train_cfg.steps_per_call
  sharding = place.stacked_batch if k > 1 else place.batch
  lead = (k,) if k > 1 else ()
  batch = {
    key: jax.ShapeDtypeStruct(lead + v.shape, v.dtype, sharding=sharding)
    for key, v in example.items()
  }
  return step_fn.trace(state, batch).lower().compile(options)


def _estimate(cfg, model_cfg, mesh, example) -> dict[str, Any]:
  """Step time and FLOPs of the full-depth step, from loop-free variants at 1 and 2 groups."""
  groups = model_cfg.num_layers // model_cfg.group_size
  accum = cfg.train.grad_accum_steps
  depths = [groups] if groups <= 2 else [1, 2]
  train = cfg.train.copy_and_resolve_references()
  train.steps_per_call, train.grad_accum_steps = 1, 1
  micro = {k: v[: v.shape[0] // accum] for k, v in example.items()}
  seconds, flops = [], []
  for g in depths:
    variant = dataclasses.replace(model_cfg, scan_layers=False, num_layers=g * model_cfg.group_size)
    compiled = compile_step(variant, train, cfg.parallel, mesh, micro, _TPU_ESTIMATE_OPTIONS)
    c = aot.cost(compiled)
    seconds.append(c["optimal_seconds"])
    flops.append(c["flops"])
  step_s = aot.extrapolate(depths, seconds, groups)
  step_flops = aot.extrapolate(depths, flops, groups)
  return {
    "step_seconds": None if step_s is None else step_s * accum,
    "flops_per_device": None if step_flops is None else step_flops * accum,
    "depths_compiled": [g * model_cfg.group_size for g in depths],
  }


def compile_only(cfg, topology: str, *, estimate: bool = True) -> dict[str, Any]:
  """Compiles the train step of `cfg` for TPU slice `topology` and reports what it would need.

  Args:
    cfg: A full experiment config.
    topology: A TPU slice ("v5e-16", "v5p-8") or topology ("v5e:4x4").
    estimate: Also compile loop-free variants for the step-time and MFU estimates.

  Returns:
    A JSON-able dict: topology, mesh, memory per device (with HBM fit), estimates, collectives.

  Raises:
    ValueError / RuntimeError: A bad topology or config (one line).
  """
  devices, gen, chips = aot.tpu_devices(topology)
  config_lib.validate_experiment(cfg, num_devices=len(devices))
  example, vocab = _example_batch(cfg)
  model_cfg = config_lib.model_config(cfg, vocab)
  mesh = mesh_lib.make_mesh(cfg.parallel, devices)
  compiled = compile_step(model_cfg, cfg.train, cfg.parallel, mesh, example)
  mem = aot.memory(compiled)
  fit, hbm = aot.fits(mem["peak_bytes"], gen, len(devices), chips)
  k = cfg.train.steps_per_call
  report = {
    "topology": aot.parse_topology(topology)[1],
    "generation": gen,
    "chips": chips,
    "devices": len(devices),
    "mesh": {axis: int(n) for axis, n in mesh.shape.items() if n > 1},
    "rules": cfg.parallel.rules,
    "memory_per_device": {**mem, "hbm_bytes": hbm, "fits": fit},
    "comm_bytes_per_step": comm_lib.per_step(compiled, k),
    "estimate": None,
  }
  if estimate:
    est = _estimate(cfg, model_cfg, mesh, example)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    micro = cfg.data.batch_size // cfg.train.grad_accum_steps
    counted = flops_lib.model_flops(model_cfg, batch_size=micro, seq_len=cfg.data.seq_len)
    model_flops, source = counted["train_per_token"] * tokens, counted["source"]
    peak = aot.CHIPS[gen].peak_flops * chips
    mfu = None
    if model_flops and est["step_seconds"]:
      mfu = model_flops / (est["step_seconds"] * peak)
    report["estimate"] = {
      **est,
      "model_flops_per_step": model_flops,
      "model_flops_source": source,
      "matmul_params": counted["matmul_params"],
      "peak_flops_per_s": peak,
      "mfu": mfu,
      "note": "XLA static cost model (optimal_seconds), not a measurement",
    }
  return report


def _size(x: float) -> str:
  for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
    if abs(x) >= scale:
      return f"{x / scale:.2f} {unit}"
  return f"{x:.0f} B"


def format_plan(report: dict[str, Any]) -> str:
  """The compile-only report as a few readable lines."""
  mem = report["memory_per_device"]
  mesh = " x ".join(f"{a}={n}" for a, n in report["mesh"].items()) or "1 device"
  lines = [
    f"TPU {report['topology']}: {report['devices']} devices on {report['chips']} chips, mesh "
    f"{mesh}, rules {report['rules']}",
    f"memory per device: peak {_size(mem['peak_bytes'])} of {_size(mem['hbm_bytes'])} HBM -> "
    + ("fits" if mem["fits"] else "DOES NOT FIT"),
    f"  arguments {_size(mem['argument_bytes'])}, outputs {_size(mem['output_bytes'])} "
    f"({_size(mem['alias_bytes'])} aliased to donated inputs), temporaries "
    f"{_size(mem['temp_bytes'])}, code {_size(mem['code_bytes'])}",
  ]
  est = report.get("estimate")
  if est:
    step = est["step_seconds"]
    depths = est["depths_compiled"]
    how = (
      f"a loop-free variant ({depths[0]} layers unrolled)"
      if len(depths) == 1
      else f"loop-free variants at {depths[0]} and {depths[1]} layers, extrapolated"
    )
    lines.append(
      "estimated step time (XLA cost model, estimate): "
      + ("n/a" if step is None else f"{step * 1e3:.4g} ms")
      + f" [from {how}]"
    )
    mfu = est["mfu"]
    lines.append(
      "estimated MFU (estimate): "
      + ("n/a" if mfu is None else f"{100 * mfu:.1f} %")
      + f" [model FLOPs {est['model_flops_source']}; peak {est['peak_flops_per_s']:.3g} FLOP/s]"
    )
  comm = report["comm_bytes_per_step"]
  parts = [f"{k} {_size(v)}" for k, v in comm.items() if k in comm_lib.KINDS and v]
  lines.append(
    "collective bytes per device per step: "
    + (", ".join(parts) or "none")
    + f" (ring link bytes {_size(comm['ring_link_total'])})"
  )
  return "\n".join(lines)

"""Compression as rules: an ordered list of (module-path regex -> method + settings).

  rules = [
    {"path": r"lm_head", "method": "none"},                            # keep it float
    {"path": r".*/mlp/.*", "method": "gptq", "settings": {"bits": 4, "group_size": 64}},
    {"path": r".*/mixer/(q|k|v|o)", "method": "int8"},
    {"path": r".*", "method": "wanda", "settings": {"n_m": "2:4"}},       # a prune method
  ]

reads "int4 GPTQ on the MLPs, int8 on attention, 2:4 Wanda everywhere but the output head".
Semantics (as in qwix, with stages added so methods compose):
  - `path` must match a module path (`compress.targets`) completely (`re.fullmatch`), and only
    modules the method applies to count (projections, or attention mixers for KV-cache methods).
    A rule that selects nothing is an error, and so is an unknown method or setting.
  - Every method belongs to a stage; stages run in the declared order (default prune -> lowrank
    -> quantize), each seeing the previous stage's weights. Within a stage, a module gets the
    first rule that matches it, in list order. `none` shields a module from every stage (or only
    from its `stage` setting) when it comes first.
  - A stage's method returns a float weight (later stages continue from it) or a replacement
    module (nothing may follow it). Zeros survive quantization: every quantizer maps an exact 0
    to 0, and GPTQ keeps the zeros of a pruned weight fixed (`compress.quantize.gptq`), so
    prune -> quantize keeps the sparsity pattern.
Calibration inputs are captured once from the uncompressed model (`compress.calibration`), not
layer by layer from the partly compressed one.
"""

import dataclasses
import functools
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reslm.compress import registry
from reslm.compress.registry import Dense, Method, Replacement
from reslm.compress.targets import Target, find_targets, install, target_at


@dataclasses.dataclass(frozen=True)
class Rule:
  """A parsed rule; `index` is its position in the list (for messages)."""

  path: str
  method: Method
  settings: dict[str, Any]
  index: int
  where: str

  def matches(self, target: Target) -> bool:
    kind_ok = self.method.target in ("any", target.kind)
    return kind_ok and re.fullmatch(self.path, target.name) is not None

  def stage_of(self) -> tuple[str, ...]:
    if self.method.name == "none":
      s = self.settings["stage"]
      return registry.STAGES if s == "all" else (s,)
    return (self.method.stage,)


def parse_rules(rules: Sequence[Any], where: str = "compress.rules") -> list[Rule]:
  """Validates rules given as dicts / ConfigDicts {path, method, settings} or tuples.

  Raises:
    ValueError: A malformed rule, a bad regex, an unknown method or setting (one line).
  """
  if isinstance(rules, str | Mapping) or not isinstance(rules, Sequence):
    raise ValueError(f"{where} must be a list of rules, got {type(rules).__name__}")
  out = []
  for i, rule in enumerate(rules):
    at = f"{where}[{i}]"
    if isinstance(rule, tuple | list):
      if not 2 <= len(rule) <= 3:
        raise ValueError(f"{at} must be (path, method) or (path, method, settings)")
      rule = dict(zip(("path", "method", "settings"), rule, strict=False))
    try:
      rule = dict(rule)
    except (TypeError, ValueError):
      raise ValueError(f"{at} must be a dict with path, method and settings") from None
    extra = set(rule) - {"path", "method", "settings"}
    if extra or "path" not in rule or "method" not in rule:
      raise ValueError(
        f"{at} has keys {sorted(rule)}; a rule has path, method and (optional) settings"
      )
    path = rule["path"]
    if not isinstance(path, str):
      raise ValueError(f"{at}.path={path!r} must be a regular expression string")
    try:
      re.compile(path)
    except re.error as e:
      raise ValueError(f"{at}.path={path!r} is not a valid regular expression: {e}") from None
    method = registry.get(rule["method"], f"{at}.method")
    settings = method.settings(rule.get("settings"), f"{at}.settings")
    out.append(Rule(path, method, settings, i, at))
  return out


@dataclasses.dataclass
class Plan:
  """What will run: per stage, per-layer steps by target and whole-model steps.

  Attributes:
    targets: Every selectable module of the model.
    order: The stages, in order.
    layer_steps: stage -> [(target, rule)] for per-layer methods.
    model_steps: stage -> [(rule, [targets])] for whole-model methods.
  """

  targets: list[Target]
  order: tuple[str, ...]
  layer_steps: dict[str, list[tuple[Target, Rule]]]
  model_steps: dict[str, list[tuple[Rule, list[Target]]]]

  def calibration_targets(self) -> list[Target]:
    """Targets some selected method needs calibration inputs for, in graph order."""
    names = {t.name for steps in self.layer_steps.values() for t, r in steps if needs(r)}
    names |= {
      t.name for steps in self.model_steps.values() for r, ts in steps if needs(r) for t in ts
    }
    return [t for t in self.targets if t.name in names]

  def needs_data(self) -> bool:
    """Whether a selected whole-model method needs `ModelData` (sequences, training batches)."""
    return any(r.method.needs_data for steps in self.model_steps.values() for r, _ in steps)

  def describe(self) -> list[str]:
    lines = []
    for stage in self.order:
      for rule, ts in self.model_steps[stage]:
        lines.append(f"{stage}: {rule.method.name} on {len(ts)} modules")
      for t, rule in self.layer_steps[stage]:
        lines.append(f"{stage}: {rule.method.name} {t.name}")
    return lines


def needs(rule: Rule) -> bool:
  return rule.method.needs_calibration


def make_plan(
  model: nnx.Module, rules: Sequence[Any], *, order: Sequence[str] = registry.STAGES, where=None
) -> Plan:
  """Resolves `rules` against the model's modules (see the module docstring).

  Raises:
    ValueError: Bad rules, an unknown stage, a method whose stage `order` omits, or a rule that
      selects no module (one line, listing the selectable paths).
  """
  where = where or "compress.rules"
  order = tuple(order)
  for stage in order:
    if stage not in registry.STAGES:
      raise ValueError(
        f"compress.order has {stage!r}; stages are {', '.join(registry.STAGES)} (any order)"
      )
  parsed = parse_rules(rules, where)
  targets = find_targets(model)
  for rule in parsed:
    if rule.method.stage != "any" and rule.method.stage not in order:
      raise ValueError(
        f"{rule.where}.method={rule.method.name!r} runs in stage {rule.method.stage!r}, which "
        f"compress.order={order} leaves out"
      )
    if not any(rule.matches(t) for t in targets):
      kind = rule.method.target
      names = [t.name for t in targets if kind in ("any", t.kind)]
      shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
      raise ValueError(
        f"{rule.where}.path={rule.path!r} matches no {'' if kind == 'any' else kind + ' '}"
        f"module of the model; paths are: {shown or 'none'}"
      )
  layer_steps = {s: [] for s in order}
  model_steps = {s: [] for s in order}
  for stage in order:
    chosen: dict[int, list[Target]] = {}
    for t in targets:
      rule = next((r for r in parsed if stage in r.stage_of() and r.matches(t)), None)
      if rule is None or rule.method.name == "none":
        continue
      if rule.method.per_layer:
        layer_steps[stage].append((t, rule))
      else:
        chosen.setdefault(rule.index, []).append(t)
    model_steps[stage] = [(parsed[i], chosen[i]) for i in sorted(chosen)]
  return Plan(targets, order, layer_steps, model_steps)


@dataclasses.dataclass
class Result:
  """What applying a plan did.

  Attributes:
    layers: One row per compressed module: path, methods, class, slices, errors per slice.
    manifest: How to rebuild the compressed structure (see `compress.checkpoint`).
  """

  layers: list[dict[str, Any]]
  manifest: list[dict[str, Any]]


def apply_plan(
  model: nnx.Module,
  plan: Plan,
  calibration: Mapping[str, np.ndarray] | None = None,
  data: registry.ModelData | None = None,
) -> Result:
  """Applies a plan in place.

  Args:
    model: The float model (modified in place).
    plan: From `make_plan` on this model.
    calibration: Target name -> inputs [slices, tokens, K] (see `compress.calibration`);
      required for the targets of methods that need calibration. A whole-model method that
      changes shapes (structured pruning) may update the entries of a dict in place.
    data: Sequences and training batches for whole-model methods with `needs_data`.

  Returns:
    A `Result` (per-module report rows and the checkpoint manifest).
  """
  calibration = calibration or {}
  rows: dict[str, dict[str, Any]] = {}
  manifest: list[dict[str, Any]] = []
  originals: dict[str, jax.Array] = {}
  replaced: dict[str, str] = {}
  for stage in plan.order:
    for rule, targets in plan.model_steps[stage]:
      args = (model, targets, calibration, rule.settings)
      if rule.method.needs_data:
        if data is None:
          raise ValueError(
            f"{rule.where}.method={rule.method.name!r} needs calibration sequences (ModelData)"
          )
        args = (*args, data)
      entries = rule.method.fn(*args) or []
      manifest.extend(entries)
      for t in targets:
        rows.setdefault(t.name, _row(t))["methods"].append(rule.method.name)
    for target, rule in plan.layer_steps[stage]:
      if target.name in replaced:
        raise ValueError(
          f"{rule.where}: {replaced[target.name]} already replaced {target.name}, so "
          f"{rule.method.name} (stage {stage}) cannot follow it; reorder compress.order or the rules"
        )
      # Re-read the module: a previous stage may have changed its weights (or shapes).
      target = target_at(model, target.path)
      w = target.weights()  # [slices, K, N]
      originals.setdefault(target.name, w)
      x = calibration.get(target.name)
      if rule.method.needs_calibration and x is None:
        raise ValueError(
          f"{rule.where}.method={rule.method.name!r} needs calibration inputs for {target.name}"
        )
      settings = rule.settings
      if rule.method.resolve is not None:  # Data-dependent static settings, one per stack.
        settings = rule.method.resolve(w, x, settings)
      # Every layer of the stack at once; errors against the weights before any stage.
      run = _batched(rule.method.name, _freeze(settings))
      result, (w_err, out_err) = run(w, x, originals[target.name])
      row = rows.setdefault(target.name, _row(target))
      row["methods"].append(rule.method.name)
      row["slices"] = [{"weight_rel_error": float(e)} for e in w_err]
      for entry, e in zip(row["slices"], [] if out_err is None else out_err, strict=False):
        entry["output_rel_error"] = float(e)
      _record_info(row, target, result, rule.method, settings)
      new = _install(model, target, result, rule)
      if new is not None:
        replaced[target.name] = rule.method.name
        row["class"] = type(new).__name__
        manifest.append({"path": list(target.path), "module": new.spec()})
  return Result(list(rows.values()), manifest)


def apply_rules(
  model: nnx.Module,
  rules: Sequence[Any],
  calibration: Mapping[str, np.ndarray] | None = None,
  *,
  order: Sequence[str] = registry.STAGES,
) -> Result:
  """`make_plan` + `apply_plan` (calibration captured beforehand for the plan's targets)."""
  return apply_plan(model, make_plan(model, rules, order=order), calibration)


def _record_info(row: dict, target: Target, result, method: Method, settings: dict) -> None:
  """Adds a replacement's per-layer `info` to the row's slices; warns where the method says."""
  info = getattr(result, "info", None) or {}
  for i, entry in enumerate(row["slices"]):
    entry.update({key: _number(value[i]) for key, value in info.items()})
    message = method.warning(entry, settings) if method.warning else None
    if message:
      warnings.warn(f"{target.slice_name(i)}: {message}", stacklevel=3)


def _number(value) -> int | float:
  value = np.asarray(value)
  return int(value) if np.issubdtype(value.dtype, np.integer) else float(value)


def _row(t: Target) -> dict[str, Any]:
  return {"path": t.name, "kind": t.kind, "layers": list(t.layers), "methods": []}


def _freeze(settings: Mapping[str, Any]) -> tuple:
  return tuple(sorted(settings.items()))


@functools.cache
def _batched(name: str, settings: tuple):
  """jit(vmap(method + its errors)) over stacked layers: one compilation per settings and shapes."""
  fn = registry.METHODS[name].fn

  def run(w, x, w0):
    result = fn(w, x, dict(settings))
    return result, _errors(result, w0, x)

  return jax.jit(jax.vmap(run))


def _errors(result, w0, x):
  """Relative weight error, and relative output error on the calibration inputs (or None)."""
  k, n = w0.shape
  if isinstance(result, Dense):
    w_new, apply = result.w, lambda x_mk: x_mk @ result.w
  else:
    layer = result.cls(
      result.arrays, in_shape=(k,), out_shape=(n,), dtype=jnp.float32, **result.static
    )
    w_new, apply = layer.dense_weight(), layer.matmul
  out = None
  if x is not None:
    x = x.astype(jnp.float32)
    out = _rel(apply(x).astype(jnp.float32), x @ w0)
  return _rel(w_new, w0), out


def _rel(a, b):
  return jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30)


def _install(model, target: Target, result, rule: Rule):
  """Writes a float result back into the kernel, or builds and installs the replacement."""
  if isinstance(result, Dense):
    kernel = target.module.kernel
    kernel[...] = result.w.reshape(kernel.shape).astype(kernel.dtype)
    return None
  if not isinstance(result, Replacement):
    raise TypeError(f"method {rule.method.name} returned {type(result).__name__}")
  return install(model, target, result.cls, result.arrays, **result.static)

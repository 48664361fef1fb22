"""Compression methods by name: what a rule's `method` refers to.

A method is registered once with its stage, what it applies to, its settings (defaults and checks)
and a function. Two shapes of function exist:

  per-layer  `fn(w_kn, x_mk, settings) -> Dense | Replacement` for one layer's weight matrix
             w [K, N] (float32; K = the input features flattened, N = the outputs flattened) and
             that layer's calibration inputs x [M, K] (None if the method needs none). The rules
             engine runs it as jit(vmap(fn)) over a stacked module's layers (`LayerStack`), so a
             method sees one layer, must be traceable (jnp, no branching on values) and compiles
             once per (settings, shapes). `Dense` is a new float weight (what pruning returns, so
             later stages continue from it); `Replacement` names a
             `compress.layers.CompressedLinear` subclass and one layer's arrays for it (what
             quantization or low-rank factoring returns; nothing runs after it), plus `info`:
             per-layer numbers for the report (e.g. outlier features found and kept). Optional
             hooks: `resolve(w [slices, K, N], x [slices, M, K] | None, settings) -> settings`
             runs eagerly on the whole stack first, for a setting that fixes a shape from the
             data (every layer of a stack shares one shape); `warning(info, settings) -> str |
             None` turns one layer's `info` into a message the engine issues as a Python warning.
  model      `fn(model, targets, calibration, settings) -> None` edits the model in place given
             every module the rule selected (structured pruning, KV-cache options, ...). With
             `needs_data`, it is called with a fifth argument, a `ModelData` (calibration
             sequences and the run's training batches: for gradient scores and fine-tuning).
             It may replace whole submodules and change the model's config (`model.cfg`):
             the compressed checkpoint stores `model.cfg`, so shrunk shapes reload.

Stages order the methods of one module: with the default order prune -> lowrank -> quantize, a
module matched by a Wanda rule and a GPTQ rule is first pruned, then quantized.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

STAGES = ("prune", "lowrank", "quantize")
TARGETS = ("linear", "attention")


@dataclasses.dataclass(frozen=True)
class Dense:
  """A float weight for the same layer: [K, N] (float32)."""

  w: jax.Array


@dataclasses.dataclass(frozen=True)
class Replacement:
  """One layer of a new module.

  Attributes:
    cls: The `CompressedLinear` subclass to build.
    arrays: That layer's arrays by name (no `layers` axis).
    static: Constructor settings (static: they cannot depend on the weights' values, so every
      layer of a stack gets the same).
    info: Scalars about this layer for the report (name -> a number), e.g. LLM.int8's outlier
      features found and kept; the rules engine adds them to the layer's report row.
  """

  cls: type
  arrays: dict[str, jax.Array]
  static: dict[str, Any]
  info: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


# Both are pytrees (cls and static are static data), so a method can run under jit and vmap:
# the rules engine maps it over a stack's layers in one compiled call.
jax.tree_util.register_pytree_node(
  Dense, lambda d: ((d.w,), None), lambda _, children: Dense(*children)
)
jax.tree_util.register_pytree_node(
  Replacement,
  lambda r: ((r.arrays, r.info), (r.cls, tuple(sorted(r.static.items())))),
  lambda aux, children: Replacement(aux[0], children[0], dict(aux[1]), children[1]),
)

Check = tuple[Callable[[Any], bool], str]


@dataclasses.dataclass(frozen=True)
class ModelData:
  """What a whole-model method with `needs_data` gets besides per-layer calibration inputs.

  Attributes:
    tokens: Calibration sequences, int32 [sequences, seq_len] (`compress.calibration`).
    batch_size: Sequences per forward pass over `tokens`.
    train_batch: Step -> the run's training batch {"inputs", "targets", "weights"}, or None.
    train: The run's `train` config section (optimizer settings), or None for the defaults.
  """

  tokens: Any
  batch_size: int = 8
  train_batch: Callable[[int], dict] | None = None
  train: Any = None


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered compression method.

  Attributes:
    name: Registry name, used in rules.
    stage: One of `STAGES` (or "any" for `none`).
    target: "linear" (Linear / ProjectOut projections) or "attention" (softmax attention
      mixers with the shared KV cache).
    fn: The function (see the module docstring for its two shapes).
    defaults: Settings and their default values.
    checks: Per setting, (predicate, description of the allowed values).
    needs_calibration: Whether `fn` needs calibration inputs.
    per_layer: True for the per-layer shape of `fn`, False for the whole-model shape.
    validate: Optional cross-setting check raising a ValueError (after the per-setting checks).
    needs_data: Whether a whole-model `fn` takes a `ModelData` as a fifth argument.
    resolve: Optional per-layer hook (stack weights, stack inputs, settings) -> settings, run
      eagerly before `fn` (see the module docstring).
    warning: Optional per-layer hook (one layer's `Replacement.info` as floats, settings) ->
      a warning message or None.
  """

  name: str
  stage: str
  target: str
  fn: Callable
  defaults: Mapping[str, Any]
  checks: Mapping[str, Check]
  needs_calibration: bool = False
  per_layer: bool = True
  validate: Callable[[dict, str], None] | None = None
  needs_data: bool = False
  resolve: Callable[[Any, Any, dict], dict] | None = None
  warning: Callable[[dict, dict], str | None] | None = None

  def settings(self, given: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """The method's defaults updated by `given`, every value checked.

    Args:
      given: The rule's settings (may be None).
      where: How the error names the settings, e.g. "compress.rules[2].settings".

    Raises:
      ValueError: An unknown setting or a value that is not allowed (one line).
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(self.defaults))
    if unknown:
      allowed = ", ".join(sorted(self.defaults)) or "none"
      raise ValueError(
        f"{where}.{unknown[0]} is not a setting of method {self.name!r}; allowed: {allowed}"
      )
    out = {**self.defaults, **given}
    for key, value in given.items():
      ok, allowed = self.checks[key]
      if not ok(value):
        raise ValueError(f"{where}.{key}={value!r} is not allowed for {self.name}: {allowed}")
    if self.validate is not None:
      self.validate(out, where)
    return out


METHODS: dict[str, Method] = {}


def register(
  name: str,
  *,
  stage: str,
  target: str = "linear",
  defaults: Mapping[str, Any] | None = None,
  checks: Mapping[str, Check] | None = None,
  needs_calibration: bool = False,
  per_layer: bool = True,
  validate: Callable[[dict, str], None] | None = None,
  needs_data: bool = False,
  resolve: Callable[[Any, Any, dict], dict] | None = None,
  warning: Callable[[dict, dict], str | None] | None = None,
):
  """Decorator registering `fn` as method `name` (see `Method` for the arguments)."""
  if stage not in (*STAGES, "any") or target not in (*TARGETS, "any"):
    raise ValueError(f"method {name!r}: stage {stage!r} / target {target!r} are not known")
  defaults = dict(defaults or {})
  checks = dict(checks or {})
  if set(checks) != set(defaults):
    raise ValueError(f"method {name!r}: every setting needs a default and a check")
  if needs_data and per_layer:
    raise ValueError(f"method {name!r}: only whole-model methods (per_layer=False) take data")
  if (resolve or warning) and not per_layer:
    raise ValueError(f"method {name!r}: resolve and warning hooks are for per-layer methods")

  def wrap(fn):
    if name in METHODS:
      raise ValueError(f"compression method {name!r} is registered twice")
    METHODS[name] = Method(
      name,
      stage,
      target,
      fn,
      defaults,
      checks,
      needs_calibration,
      per_layer,
      validate,
      needs_data,
      resolve,
      warning,
    )
    return fn

  return wrap


def get(name: str, where: str = "method") -> Method:
  """The method called `name`; a one-line ValueError listing the known ones otherwise."""
  if name not in METHODS:
    raise ValueError(
      f"{where}={name!r} is not a known compression method; choose one of: "
      f"{', '.join(sorted(METHODS))}"
    )
  return METHODS[name]


# Small predicates for settings checks.
def is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
  return isinstance(v, int | float) and not isinstance(v, bool)


def one_of(*values) -> Check:
  return (lambda v: v in values and type(v) is type(values[0]), " or ".join(map(repr, values)))


def number(lo: float, hi: float, *, lo_open: bool = False) -> Check:
  if lo_open:
    return (lambda v: is_num(v) and lo < v <= hi, f"a number in ({lo}, {hi}]")
  return (lambda v: is_num(v) and lo <= v <= hi, f"a number in [{lo}, {hi}]")


def integer(lo: int, hi: int | None = None) -> Check:
  if hi is None:
    return (lambda v: is_int(v) and v >= lo, f"an integer >= {lo}")
  return (lambda v: is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]")


BOOL: Check = (lambda v: isinstance(v, bool), "True or False")


@register(
  "none",
  stage="any",
  target="any",
  defaults={"stage": "all"},
  checks={"stage": (lambda v: v in (*STAGES, "all"), f"one of {', '.join(STAGES)}, all")},
)
def _none(w_kn, x_mk, settings):
  """Keeps a module as it is: as the first matching rule of a stage, it shields the module."""
  del x_mk, settings
  return Dense(w_kn)

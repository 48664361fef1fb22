"""Name -> constructor registries for the pieces a block is assembled from.

A block's sequence mixer and MLP are looked up by name from the model config, so a new attention
variant, state-space layer or MLP is one registered builder and no change to the model. A builder
receives the model config and returns a module built from plain arguments; the module itself never
sees the config, so it stays importable on its own.
"""

import re
from collections.abc import Callable, Mapping
from typing import Any

# A layer's error that starts with one of its arguments: "chunk_size=0 is not allowed ...".
_ARGUMENT = re.compile(r"([A-Za-z_]\w*)=")


class Registry:
  """A mapping from names to builders with errors that list the valid names.

  Attributes:
    kind: What the entries are, for error messages (e.g. "sequence mixer").
    setting: The config setting that selects an entry (e.g. "model.mixer").
    options: The model-config field holding the entries' settings (e.g. "mixer_options"), or None.
  """

  def __init__(self, kind: str, setting: str, options: str | None = None):
    self.kind = kind
    self.setting = setting
    self.options = options
    self._entries: dict[str, Callable[..., Any]] = {}

  def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that registers `fn` under `name`."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = fn
      return fn

    return wrap

  def get(self, name: str) -> Callable[..., Any]:
    """Returns the builder for `name`; an unknown name raises a one-line ValueError."""
    self.check(name)
    return self._entries[name]

  def build(self, name: str, cfg, **kwargs) -> Any:
    """Builds entry `name` from the model config; layer errors gain their config path.

    A layer names its own arguments in errors (`chunk_size=0 is not allowed ...`), so it reads
    right to someone using the layer alone. Built from a config, the same message is prefixed
    with where that argument is set: `model.<field>` for a model setting, else the options table
    (`model.mixer_options[.<name>].`).
    """
    try:
      return self.get(name)(cfg, **kwargs)
    except ValueError as e:
      raise ValueError(self._config_path(str(e), cfg, name)) from None

  def _config_path(self, message: str, cfg, name: str) -> str:
    match = _ARGUMENT.match(message)
    if match is None:
      return message
    key = match[1]
    table = thaw_options(getattr(cfg, self.options)) if self.options else {}
    own = table.get(name)
    if isinstance(own, Mapping) and key in own:
      return f"model.{self.options}.{name}.{message}"
    if key in table or (self.options and not hasattr(cfg, key)):
      return f"model.{self.options}.{message}"
    if hasattr(cfg, key):
      return f"model.{message}"
    return message

  def check(self, name: str) -> None:
    if name not in self._entries:
      raise ValueError(
        f"{self.setting}={name!r} is not a known {self.kind}; choose one of: "
        + ", ".join(self.names())
      )

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries


def is_int(value, low: int) -> bool:
  """Whether `value` is an int (not a bool) >= low."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_number(value) -> bool:
  """Whether `value` is an int or float (not a bool)."""
  return isinstance(value, int | float) and not isinstance(value, bool)


def check_option(module: str, name: str, value, ok: bool, allowed: str) -> None:
  """Unless `ok`, raises a one-line ValueError naming the argument, the bad value and what is allowed.

  The message names the layer's own argument (`chunk_size=0 ...`); `Registry.build` adds the
  config path (`model.mixer_options.`) when the layer is built from a config.

  Args:
    module: The registered name of the module, e.g. "mamba".
    name: The argument's name (the option's key).
    value: The value given.
    ok: Whether the value is acceptable.
    allowed: What is allowed, e.g. "an integer >= 1".
  """
  if not ok:
    raise ValueError(f"{name}={value!r} is not allowed for {module}: {allowed}")


def check_int(module: str, name: str, value, low: int, allowed: str = "") -> int:
  """`check_option` for an integer >= low (`allowed` defaults to "an integer >= low")."""
  check_option(module, name, value, is_int(value, low), allowed or f"an integer >= {low}")
  return value


# Builders have the signature `(cfg: ModelConfig, *, causal: bool, rngs: nnx.Rngs) -> nnx.Module`.
MIXERS = Registry("sequence mixer", "model.mixer", options="mixer_options")
MLPS = Registry("MLP", "model.mlp", options="mlp_options")
NORMS = Registry("normalisation", "model.norm")


def freeze_options(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
  """Options as sorted (key, value) pairs, nested mappings too, so configs stay hashable."""
  return tuple(
    sorted(
      (k, freeze_options(v) if isinstance(v, Mapping) else v) for k, v in dict(options).items()
    )
  )


def thaw_options(frozen) -> dict[str, Any]:
  """The inverse of `freeze_options`: nested pair tuples back to dicts."""

  def is_pairs(v):
    return isinstance(v, tuple) and all(
      isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in v
    )

  items = frozen.items() if isinstance(frozen, Mapping) else frozen
  return {k: thaw_options(v) if is_pairs(v) and v else v for k, v in items}


def layer_kwargs(cfg, rngs) -> dict[str, Any]:
  """The constructor arguments most registered layers take from the model config alike."""
  return dict(
    init_std=cfg.init_std,
    out_init_std=cfg.out_init_std,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.storage_dtype,
    rngs=rngs,
  )


def module_options(
  options, name: str, defaults: Mapping[str, Any], *, setting: str, registry: Registry
) -> dict[str, Any]:
  """The settings of one registered module from a shared options table, with defaults.

  The table may hold flat keys, which apply to every module of the kind (convenient when a model
  uses one mixer), and namespaced entries `{name: {...}}`, which apply only to `name` (needed in
  hybrids such as "mamba,mamba,flash" whose mixers take different settings). Namespaced values win.

  Args:
    options: The table, a mapping or frozen pairs (e.g. `ModelConfig.mixer_options`).
    name: The registered name of the module being built.
    defaults: Every setting the module accepts, with its default.
    setting: The config path of the table, for error messages ("model.mixer_options").
    registry: The registry `name` comes from; its names mark namespaced entries.

  Returns:
    The merged settings dict.

  Raises:
    ValueError: A key the module does not accept (one line, naming the key and the valid ones).
  """
  table = thaw_options(options)
  flat = {k: v for k, v in table.items() if k not in registry}
  own = table.get(name, {})
  if not isinstance(own, Mapping):
    raise ValueError(f"{setting}.{name} must be a mapping of {name!r} settings; got {own!r}")
  checks = [(k, f"{setting}.{k}", True) for k in flat]
  checks += [(k, f"{setting}.{name}.{k}", False) for k in own]
  for key, where, is_flat in checks:
    if key not in defaults:
      hint = f" (a flat key applies to every {registry.kind}; use {setting}.<name>.{key})"
      raise ValueError(
        f"{where} is not a setting of {registry.kind} {name!r}; its settings: "
        f"{', '.join(sorted(defaults)) or '(none)'}" + (hint if is_flat else "")
      )
  return {**defaults, **flat, **own}


def mixer_options(cfg, name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
  """A mixer's settings from `model.mixer_options` (flat or namespaced by name), with defaults.

  See `module_options`; unknown keys raise a one-line ValueError.
  """
  return module_options(
    cfg.mixer_options, name, defaults, setting="model.mixer_options", registry=MIXERS
  )

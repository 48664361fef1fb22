"""Name -> constructor registries for the pieces a block is assembled from.

A block's sequence mixer and MLP are looked up by name from the model config, so a new attention
variant, state-space layer or MLP is one registered builder and no change to the model. A builder
receives the model config and returns a module built from plain arguments; the module itself never
sees the config, so it stays importable on its own.
"""

from collections.abc import Callable
from typing import Any


class Registry:
  """A mapping from names to builders with errors that list the valid names.

  Attributes:
    kind: What the entries are, for error messages (e.g. "sequence mixer").
    setting: The config setting that selects an entry (e.g. "model.mixer").
  """

  def __init__(self, kind: str, setting: str):
    self.kind = kind
    self.setting = setting
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


# Builders have the signature `(cfg: ModelConfig, *, causal: bool, rngs: nnx.Rngs) -> nnx.Module`.
MIXERS = Registry("sequence mixer", "model.mixer")
MLPS = Registry("MLP", "model.mlp")
NORMS = Registry("normalisation", "model.norm")

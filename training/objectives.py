"""Config sections that replace the training loss, registered by the package that defines them.

The loop knows objectives only through this table: a section such as `distill`
(`reslm.compress.distill`) registers a validator and a setup hook when its module is imported, so
`training` never imports the packages built on top of it.

  register_section("distill", validate=validate_config, setup=setup)

`validate(cfg, *, pipeline)` raises a one-line `ValueError`; `setup(cfg, model_cfg, dataset,
workdir)` returns `(Objective or None, training dataset)` (see `training.steps.Objective`).
"""

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class ObjectiveSection:
  validate: Callable[..., None]
  setup: Callable[..., tuple]


SECTIONS: dict[str, ObjectiveSection] = {}


def register_section(name: str, *, validate: Callable[..., None], setup: Callable[..., tuple]):
  """Makes `name` a known config section whose hooks the loop calls."""
  if name in SECTIONS and SECTIONS[name] != ObjectiveSection(validate, setup):
    raise ValueError(f"objective section {name!r} is already registered")
  SECTIONS[name] = ObjectiveSection(validate, setup)


def sections_in(cfg) -> list[str]:
  """The registered objective sections present in `cfg` (at most one may be)."""
  names = [name for name in SECTIONS if name in cfg]
  if len(names) > 1:
    raise ValueError(f"config has several objective sections ({', '.join(names)}); use one")
  return names


def setup(cfg, model_cfg, dataset, workdir: str):
  """(objective or None, training dataset) for the config's objective section, if it has one."""
  for name in sections_in(cfg):
    return SECTIONS[name].setup(cfg, model_cfg, dataset, workdir)
  return None, dataset

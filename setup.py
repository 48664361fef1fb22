"""Installs the repository's top-level rooms as subpackages of one namespace, `reslm`.

The folders stay at the top of the checkout (`models/`, `data/`, ...) but are imported as
`reslm.models`, `reslm.data`, ...: a user project with its own `models/` or `data/` package can
then import this library without either shadowing the other. `experiments/` (entry points and
benchmarks that write results next to themselves) and `tests/` are not installed. `reslm` itself is
an implicit namespace package (PEP 420): it has no `__init__.py` of its own.
"""

from setuptools import find_packages, setup

NAMESPACE = "reslm"
ROOMS = (
  "models",
  "parallel",
  "compress",
  "kernels_pallas",
  "data",
  "training",
  "metrics",
  "inference",
  "hf",
)

packages = [
  f"{NAMESPACE}.{name}"
  for name in find_packages(include=[f"{room}{tail}" for room in ROOMS for tail in ("", ".*")])
]
setup(
  packages=packages,
  package_dir={f"{NAMESPACE}.{room}": room for room in ROOMS},
)

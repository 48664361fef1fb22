"""What the absl entry points share: flag definitions and turning errors into one-line exits."""

import functools
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags


def define_config_flag() -> None:
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, optionally with a variant: path.py[:variant].",
    lock_config=True,
  )


def define_workdir_flag() -> None:
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, reports).", required=True)


def one_line_errors(main):
  """Wraps an absl `main` so bad input exits non-zero with `error: <message>`, no traceback."""

  @functools.wraps(main)
  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Library INFO chatter (orbax) only with -v 0.
    try:
      return main(argv)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
      sys.exit(f"error: {e}".splitlines()[0])

  return wrapped


def _config_arg(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_config_arg(argv: list[str]) -> None:
  """Fails in one line on a missing config file or an unknown variant, before absl parses it.

  ml_collections reports both as multi-line tracebacks from inside flag parsing.
  """
  spec = _config_arg(argv)
  if spec is None:
    return
  path, _, variant = spec.partition(":")
  configs_dir = os.path.join(os.path.dirname(__file__), "configs")
  if not os.path.isfile(path):
    known = sorted(
      os.path.relpath(os.path.join(root, f), os.getcwd())
      for root, _, files in os.walk(configs_dir)
      for f in files
      if f.endswith(".py") and not f.startswith("_")
    )
    sys.exit(f"error: --config={spec}: no such config file; choose one of: {', '.join(known)}")
  module_spec = importlib.util.spec_from_file_location("_checked_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    module.get_config(variant or None) if variant else module.get_config()
  except ValueError as e:
    sys.exit(f"error: --config={spec}: {e}")


def run(main) -> None:
  """`absl.app.run(main)` after checking the --config argument."""
  check_config_arg(sys.argv)
  app.run(main)

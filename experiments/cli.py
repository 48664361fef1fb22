"""What the absl entry points share: flag definitions and turning errors into one-line exits.

Bad input ends in one line, `error: <message>`, and a non-zero exit, never a traceback: a
misspelt `--config.` field (with the config's "did you mean"), a bad flag value, any `ValueError`
or `RuntimeError` from the library, and OS errors (a full disk, a read-only directory). Module
settings tables (`model.mixer_options`, `model.mlp_options`) take keys the config file does not
list, so `--config.model.mlp_options.num_experts=8` works like any other override.
"""

import ast
import errno
import functools
import importlib.util
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Settings tables whose keys depend on the chosen module (`models.registry.module_options`).
OPEN_TABLES = ("model.mixer_options", "model.mlp_options")


def define_config_flag() -> None:
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, optionally with a variant: path.py[:variant].",
    lock_config=True,
  )


def define_workdir_flag() -> None:
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, reports).", required=True)


def _quiet_orbax(record) -> bool:
  """Orbax logs each failure it re-raises, with tracebacks, from several threads; the error
  that reaches `main` is reported once instead."""
  return "/orbax/" not in record.pathname or record.levelno >= logging.converter.STANDARD_CRITICAL


def _quiet_closed_loops(hook):
  """A `sys.unraisablehook` that drops 'Event loop is closed' from I/O callbacks (tensorstore)
  completing after orbax gave up on a failed write; that failure is the error reported."""

  def unraisablehook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    hook(unraisable)

  return unraisablehook


def _disk_full(e: BaseException) -> bool:
  if isinstance(e, OSError) and e.errno == errno.ENOSPC:
    return True
  if "reslm.training.checkpoint" in sys.modules:  # Not imported for --help or flag errors.
    return isinstance(e, sys.modules["reslm.training.checkpoint"].DiskFullError)
  return False


def error_line(e: BaseException) -> str:
  """`error: <first line of the message>`; OS errors name the path."""
  if isinstance(e, OSError) and e.strerror:
    text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
  else:
    text = str(e).strip() or type(e).__name__
  return f"error: {text}".splitlines()[0]


def one_line_errors(main):
  """Wraps an absl `main` so bad input exits non-zero with `error: <message>`, no traceback."""

  @functools.wraps(main)
  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Library INFO chatter (orbax) only with -v 0.
      logging.get_absl_handler().addFilter(_quiet_orbax)
      sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
    try:
      return main(argv)
    except (ValueError, RuntimeError, OSError) as e:
      if _disk_full(e):
        # I/O threads of the failed write still finish in the background and would print from
        # interpreter shutdown; nothing is left to clean up that is worth those lines.
        print(error_line(e), file=sys.stderr, flush=True)
        os._exit(1)
      sys.exit(error_line(e))

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


def _literal(text: str):
  """A flag value as Python: numbers, booleans (also lower case), lists; else the string."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def split_open_table_args(argv: list[str]) -> tuple[list[str], list[tuple[str, str, object]]]:
  """Takes `--config.<table>.<key>[.<key>]=<value>` for the `OPEN_TABLES` out of `argv`.

  Returns:
    (the other arguments, [(argument, dotted key under the config, value)]).
  """
  rest, taken = [], []
  pattern = re.compile(
    r"--config\.(" + "|".join(re.escape(t) for t in OPEN_TABLES) + r")\.([\w.]+)=(.*)", re.S
  )
  for arg in argv:
    m = pattern.fullmatch(arg)
    if m:
      taken.append((arg, f"{m[1]}.{m[2]}", _literal(m[3])))
    else:
      rest.append(arg)
  return rest, taken


def apply_open_table_args(config, taken) -> None:
  """Sets the taken settings on the (locked) config, creating keys and nested tables."""
  for arg, dotted, value in taken:
    *parents, leaf = dotted.split(".")
    node = config
    with config.unlocked():
      for key in parents:
        if key not in node or node[key] is None:
          node[key] = {}
        node = node[key]
        if not hasattr(node, "keys"):
          raise ValueError(f"{arg}: {key} is set to {node!r}, not a table of settings")
      try:
        node[leaf] = value
      except (TypeError, ValueError) as e:
        raise ValueError(f"{arg}: {e}".splitlines()[0]) from None


def _override_error(argv: list[str], e: Exception) -> str:
  """One line for a config override ml_collections rejected (misspelt field or section)."""
  inner = e
  while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError(message)).
    inner = inner.args[0]
  text = str(inner)
  missing = re.search(r"'(\w+)'", text)
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  arg = next(
    (
      a
      for a in argv
      if a.startswith("--config.") and missing and missing[1] in re.split(r"[.=]", a[9:])
    ),
    None,
  )
  if missing is None or arg is None:
    return f"error: {text}".splitlines()[0]
  path = arg[len("--config.") :].split("=", 1)[0]
  parent = path.rsplit(f".{missing[1]}", 1)[0] if f".{missing[1]}" in path else "the config"
  hint = f"; did you mean {suggestion[1]!r}?" if suggestion else ""
  return f"error: {arg}: {missing[1]!r} is not a setting of {parent}{hint}"


def parse_flags(argv: list[str], taken=()) -> list[str]:
  """absl's flag parsing with every failure as one `error:` line (the `app.run` parser); then
  the `taken` open-table settings (`split_open_table_args`) are applied to the config."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(error_line(e))
  except (KeyError, AttributeError, TypeError, ValueError) as e:  # ml_collections overrides.
    sys.exit(_override_error(argv, e))
  if taken:
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if config is None or "model" not in config:
      sys.exit(f"error: {taken[0][0]}: this command's config has no model section")
    try:
      apply_open_table_args(config, taken)
    except ValueError as e:
      sys.exit(error_line(e))
  return rest


def run(main) -> None:
  """`absl.app.run(main)` after checking the --config argument, with one-line flag errors."""
  check_config_arg(sys.argv)
  # ml_collections reads the overrides from sys.argv itself, so they leave it here.
  sys.argv[:], taken = split_open_table_args(sys.argv)
  app.run(main, flags_parser=functools.partial(parse_flags, taken=taken))

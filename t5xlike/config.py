"""Command-line flags and gin configuration, with one-line errors.

T5X spelling: `--gin_file=F` (repeatable), `--gin.NAME=VALUE` (rewritten to
the gin binding `NAME = VALUE`), `--gin_bindings=...` and
`--gin_search_paths=DIR[,DIR]`. Gin files are found relative to the current
directory, the search paths and the repository's `gin_configs/`.

Checks that gin itself does not make: every gin file exists before any is
parsed, and `--gin.NAME=VALUE` for a macro (`NAME` without a dot) is refused
unless a loaded gin file defines that macro, so a typo such as
`--gin.TRAIN_STEP=10` cannot silently do nothing. A value that is not a gin
literal (`--gin.MODEL_DIR=/tmp/run`) is taken as a string.
"""
from __future__ import annotations

import argparse
import os
import difflib
import logging
import pathlib
import re
from typing import Sequence

import gin

REPO_GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"
_MACRO = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(ValueError):
  """A user error in flags or gin configuration: reported in one line, exit code 2."""


class RunError(RuntimeError):
  """A started run that failed for a known reason (disk full, NaN loss): reported in one
  line, exit code 1; `--verbose` (or T5XLIKE_TRACEBACK=1) shows the traceback."""


def one_line(error: BaseException) -> str:
  """Squeezes a (multi-line gin) error message into one line."""
  text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
  # Gin appends where the configurable was called; the culprit is named before.
  text = text.split(" In call to configurable")[0]
  return re.sub(r"\s+", " ", text) or type(error).__name__


def quiet_gin_search_logs() -> None:
  """Hides gin's 'Path not found' warnings while it tries each search path."""
  logging.getLogger().addFilter(lambda record: not str(record.msg).startswith(
      ("Path not found", "system_path_file_exists")))


def build_parser(description: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file to load (repeatable, loaded in order)")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="gin binding 'NAME = VALUE' (repeatable)")
  parser.add_argument("--gin_search_paths", action="append", default=[],
                      help="comma-separated directories searched for gin files and includes")
  parser.add_argument("--coordinator_address", default=None,
                      help="HOST:PORT of process 0 for multi-process runs")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--verbose", action="store_true",
                      help="show the Python traceback of errors (also T5XLIKE_TRACEBACK=1)")
  return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
  """Parses argv; `--gin.NAME=VALUE` become `(NAME, VALUE)` pairs in `args.gin_overrides`."""
  overrides, rest = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep or not name:
        raise ConfigError(f"{arg}: expected --gin.NAME=VALUE")
      overrides.append((name.strip(), value.strip()))
    else:
      rest.append(arg)
  args, unknown = parser.parse_known_args(rest)
  if unknown:
    raise ConfigError(f"unknown flag(s): {' '.join(unknown)}")
  args.gin_overrides = overrides
  return args


def search_paths(extra: Sequence[str]) -> list[pathlib.Path]:
  paths = [pathlib.Path(p) for item in extra for p in item.split(",") if p]
  return paths + [pathlib.Path.cwd(), REPO_GIN_DIR]


def find_gin_file(name: str, paths: Sequence[pathlib.Path]) -> pathlib.Path:
  candidate = pathlib.Path(name)
  if candidate.is_absolute():
    if candidate.is_file():
      return candidate
  else:
    for base in paths:
      for path in (base / candidate, base / "gin_configs" / candidate):
        if path.is_file():
          return path
  raise ConfigError(f"gin file {name!r} not found (searched: "
                    f"{', '.join(str(p) for p in paths)})")


def _defined_macros() -> set[str]:
  # gin keeps macros as bindings of the configurable `gin.macro`, scoped by name.
  return {scope for (scope, selector) in gin.config._CONFIG if selector == "gin.macro"}  # pylint: disable=protected-access


def _parse_override(name: str, value: str) -> None:
  try:
    gin.parse_config(f"{name} = {value}")
  except (ValueError, SyntaxError) as error:
    if value[:1] in "'\"" or not value:
      raise ConfigError(f"--gin.{name}={value}: {one_line(error)}") from None
    try:  # A bare string such as a path: bind it quoted.
      gin.parse_config(f"{name} = {value!r}")
    except Exception:  # pylint: disable=broad-except
      raise ConfigError(f"--gin.{name}={value}: {one_line(error)}") from None


def configure(gin_files: Sequence[str], overrides: Sequence[tuple[str, str]] = (),
              bindings: Sequence[str] = (), extra_search_paths: Sequence[str] = ()) -> None:
  """Loads gin files then overrides; raises ConfigError naming the culprit."""
  if not gin_files:
    raise ConfigError("no --gin_file given")
  gin.clear_config(clear_constants=False)
  paths = search_paths(extra_search_paths)
  files = [find_gin_file(name, paths) for name in gin_files]
  for path in paths:
    if path.is_dir():
      gin.add_config_file_search_path(str(path))
  gin.add_config_file_search_path(str(REPO_GIN_DIR))
  for path in files:
    try:
      gin.parse_config_file(str(path))
    except (ValueError, SyntaxError, ImportError, IOError, TypeError) as error:
      raise ConfigError(f"gin file {path}: {one_line(error)}") from None
  macros = _defined_macros()
  for name, value in overrides:
    if _MACRO.match(name) and name not in macros:
      close = difflib.get_close_matches(name, macros, n=1)
      hint = (f"did you mean {close[0]}?" if close
              else f"defined: {', '.join(sorted(macros)) or 'none'}")
      raise ConfigError(f"--gin.{name}: no loaded gin file defines the macro {name} ({hint})")
    _parse_override(name, value)
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except (ValueError, SyntaxError, ImportError) as error:
      raise ConfigError(f"--gin_bindings={binding}: {one_line(error)}") from None
  try:
    gin.finalize()
  except ValueError as error:  # e.g. a macro that is used but never bound.
    raise ConfigError(one_line(error).split(" in config string")[0]) from None


def require_int(name: str, value, minimum: int = 1) -> int:
  """`value` as an int >= minimum, or a ConfigError naming the macro."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return value


def _cluster_environment() -> str | None:
  """The multi-host environment JAX can configure itself from, if any."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "SLURM"
  if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "Cloud TPU"
  return None


def initialize_distributed(args: argparse.Namespace) -> None:
  """Starts `jax.distributed` for multi-process runs.

  With `--num_processes > 1` the flags are passed on; without flags, a
  multi-host SLURM job or Cloud TPU slice is detected from its environment
  and `jax.distributed.initialize()` finds the coordinator itself.
  """
  import jax  # pylint: disable=g-import-not-at-top
  # Only CPU devices use these collectives; GPUs and TPUs keep their own.
  if args.num_processes is not None and args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)
  elif args.coordinator_address is None and _cluster_environment():
    logging.getLogger(__name__).info("multi-host %s environment detected",
                                     _cluster_environment())
    jax.distributed.initialize()

"""The flags every command takes, in T5X's spelling, with one-line errors.

`--gin_file=F` (repeatable), `--gin.NAME=VALUE` (collected as `(NAME, VALUE)`
pairs in `args.gin_overrides`; `t5xlike.cli.gin_config` binds them),
`--gin_bindings=...`, `--gin_search_paths=DIR[,DIR]`, the multi-process
flags of `jax.distributed` and `--verbose`.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from t5xlike.errors import ConfigError


def build_parser(description: str) -> argparse.ArgumentParser:
  """The parser with the flags every command shares (a command adds its own)."""
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

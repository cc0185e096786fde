"""What every command-line entry point shares: flags -> gin -> one root call.

`run_entry` sets up logging, parses `--gin_file` / `--gin.NAME=VALUE` and the
entry's own flags, starts `jax.distributed` where asked, loads the gin files
and calls the entry's gin root. Exit codes: 0 done, 2 a configuration or
input error (one line on stderr, no file written: the root marks when it
starts writing with `mark_run_started`), 1 a started run that failed for a
known reason (`errors.RunError`: disk full while saving, a NaN loss; one
line), 130 a run stopped by SIGINT after its checkpoint (SIGTERM: 0, see
`t5xlike.training.preemption`), anything else a crash with its traceback.
`--verbose` or T5XLIKE_TRACEBACK=1 shows the traceback of every error.

Logging: t5xlike's INFO lines on stdout (process 0; `--verbose`: its DEBUG lines too,
and the runs print what they otherwise only write to a file, such as a training run's
`plan.txt`), other libraries' WARNING lines; third-party start-up noise is filtered
(`startup_noise`) before TensorFlow or JAX load.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from t5xlike.cli import console_log, distributed, flags, gin_config, startup_noise
from t5xlike.errors import ConfigError, RunError, one_line
from t5xlike.training import preemption

_RUN_STARTED = False
_VERBOSE = False


def mark_run_started() -> None:
  """Called by a root once validation has passed and it may write files:
  later exceptions are crashes (traceback), not configuration errors."""
  global _RUN_STARTED
  _RUN_STARTED = True


def run_started() -> bool:
  return _RUN_STARTED


def verbose() -> bool:
  """Whether the entry point was given `--verbose` (print the full plan, DEBUG lines)."""
  return _VERBOSE


def run_entry(description: str, call_root: Callable[[argparse.Namespace], object],
              add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
              argv: Sequence[str] | None = None) -> int:
  """Runs one entry point; `call_root(args)` calls the gin root after configuration."""
  global _RUN_STARTED, _VERBOSE
  _RUN_STARTED = _VERBOSE = False
  startup_noise.quiet()  # (the commands import neither TensorFlow nor JAX before this)
  console_log.configure()
  gin_config.quiet_gin_search_logs()
  parser = flags.build_parser(description)
  if add_flags is not None:
    add_flags(parser)
  argv = sys.argv[1:] if argv is None else argv
  verbose = "--verbose" in argv or bool(os.environ.get("T5XLIKE_TRACEBACK"))
  try:
    args = flags.parse_args(parser, argv)
    _VERBOSE = bool(args.verbose)
    if _VERBOSE:
      logging.getLogger("t5xlike").setLevel(logging.DEBUG)
    distributed.initialize_distributed(args)
    import jax  # noqa: PLC0415  (after the flags: --help and flag errors stay fast)
    if jax.process_index() != 0:  # Only process 0 reports progress.
      logging.getLogger("t5xlike").setLevel(logging.WARNING)
    gin_config.configure(args.gin_file, args.gin_overrides, args.gin_bindings,
                         args.gin_search_paths)
    call_root(args)
  except preemption.Stopped as stop:
    logging.getLogger("t5xlike").warning("%s: exit code %d", stop, stop.exit_code)
    return stop.exit_code
  except (ConfigError, RunError) as error:
    if verbose:
      traceback.print_exc()
    print(f"error: {one_line(error)}", file=sys.stderr)
    return 2 if isinstance(error, ConfigError) else 1
  except Exception as error:
    if _RUN_STARTED or verbose:
      raise
    # Raised while gin built the run (e.g. a required binding is missing):
    # nothing has been written yet, so it is a configuration error.
    print(f"error: {one_line(error)}", file=sys.stderr)
    return 2
  return 0

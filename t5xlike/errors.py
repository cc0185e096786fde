"""The error types every command reports in one line, and checks of configured values.

A leaf module (standard library only): models, data, checkpoints and the
runs raise these, and `t5xlike.cli.entry` turns them into exit codes:

* `ConfigError`: a user error in flags, gin bindings or inputs, found before
  anything is written: one line on stderr, exit code 2.
* `RunError`: a started run that failed for a known reason (disk full while
  saving, a NaN loss): one line, exit code 1.
"""
from __future__ import annotations

import re


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


def require_int(name: str, value: object, minimum: int = 1) -> int:
  """`value` as an int >= minimum, or a ConfigError naming the macro `name`."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return value

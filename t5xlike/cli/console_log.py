"""The console log of the command-line entry points: one root handler on stdout.

`configure()` is what every `python -m t5xlike.*` command calls first: t5xlike's INFO
lines (progress, the plan, where files went) and other libraries' WARNING lines, one
"HH:MM:SS message" line each, on standard output, so that standard error carries only
errors.
"""
from __future__ import annotations

import logging
import sys

_LOG_FORMAT = "%(asctime)s %(message)s"


class ConsoleHandler(logging.StreamHandler):
  """Writes log lines to `sys.stdout` (or `sys.stderr`) as it is when each line is written.

  A plain `StreamHandler` keeps the stream it was given; when that was a replaced
  `sys.stdout` that has since been closed (a test's capture), every later line fails with
  "--- Logging error ---". `setStream(sys.stderr)` switches it to stderr.
  """

  def __init__(self, stream_name: str = "stdout"):
    super().__init__()
    self._stream_name = stream_name

  @property
  def stream(self):
    return getattr(sys, self._stream_name)

  @stream.setter
  def stream(self, value) -> None:
    self._stream_name = "stderr" if value is sys.stderr else "stdout"


def configure() -> None:
  """t5xlike's INFO lines and other libraries' WARNING lines on stdout.

  Replaces the plain stderr handler that `logging.basicConfig()` installs when a library
  logs before this runs (absl does, on importing orbax), and earlier `ConsoleHandler`s; a
  root logger with any other handler (an application's, a test runner's capture) is left
  as it is.
  """
  root = logging.getLogger()
  for handler in list(root.handlers):
    if type(handler) in (logging.StreamHandler, ConsoleHandler):
      root.removeHandler(handler)
  if not root.handlers:
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
  logging.getLogger("t5xlike").setLevel(logging.INFO)

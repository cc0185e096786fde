"""The entry points' console log: one stdout handler that never holds a closed stream."""
import io
import logging
import sys

import pytest

from t5xlike.cli import console_log


@pytest.fixture
def bare_root(monkeypatch):
  """Returns a function that empties the root logger's handlers (as in a fresh `python -m`
  process; called in the test body, after pytest has added its capture for the call);
  restored after the test."""
  root = logging.getLogger()
  monkeypatch.setattr(root, "level", root.level)

  def empty():
    monkeypatch.setattr(root, "handlers", [])
    return root
  return empty


def _record(message: str) -> logging.LogRecord:
  return logging.LogRecord("t5xlike.x", logging.INFO, __file__, 1, message, None, None)


def test_the_handler_writes_to_stdout_as_it_is_when_the_line_is_written(monkeypatch):
  first = io.StringIO()
  monkeypatch.setattr(sys, "stdout", first)
  handler = console_log.ConsoleHandler()
  first.close()  # A test's capture, closed when that test ended.
  second = io.StringIO()
  monkeypatch.setattr(sys, "stdout", second)
  handler.emit(_record("after the capture closed"))
  assert second.getvalue() == "after the capture closed\n"
  handler.setStream(sys.stderr)  # (what `t5xlike.compile` does: its stdout is the report)
  err = io.StringIO()
  monkeypatch.setattr(sys, "stderr", err)
  handler.emit(_record("on stderr"))
  assert err.getvalue() == "on stderr\n" and second.getvalue() == "after the capture closed\n"


def test_configure_replaces_basicconfigs_stderr_handler(bare_root, monkeypatch):
  root = bare_root()
  logging.basicConfig()  # What absl's first log line does (orbax logs on import).
  assert [type(h) for h in root.handlers] == [logging.StreamHandler]
  console_log.configure()
  console_log.configure()  # Idempotent: one handler.
  assert [type(h) for h in root.handlers] == [console_log.ConsoleHandler]
  out = io.StringIO()
  monkeypatch.setattr(sys, "stdout", out)
  logging.getLogger("t5xlike.x").info("step 1")
  logging.getLogger("other").info("hidden")
  logging.getLogger("other").warning("shown")
  lines = out.getvalue().splitlines()
  assert [line.split(" ", 1)[1] for line in lines] == ["step 1", "shown"]
  assert all(len(line.split(" ", 1)[0]) == len("12:34:56") for line in lines)


def test_configure_leaves_an_applications_handler_alone(bare_root):
  root = bare_root()
  theirs = logging.NullHandler()  # Any handler that is not a plain StreamHandler.
  root.addHandler(theirs)
  console_log.configure()
  assert root.handlers == [theirs]

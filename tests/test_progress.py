"""t5xlike.progress: a tqdm bar on a terminal, else a log line every LOG_EVERY_S seconds with
the count, the rate and the ETA; the task cache writer shows it."""
import io
import logging

import numpy as np
import pytest

from t5xlike import progress
from t5xlike.data import task_cache


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class Terminal(io.StringIO):
  def isatty(self):
    return True


def lines(caplog):
  return [r.getMessage() for r in caplog.records if r.name == "t5xlike.progress"]


def test_off_a_terminal_one_line_every_interval_with_rate_and_eta(caplog):
  caplog.set_level(logging.INFO, logger="t5xlike.progress")
  clock = Clock()
  with progress.Progress("scoring", 100, stream=io.StringIO(), clock=clock) as shown:
    for now, count in ((10.0, 10), (29.9, 10), (30.0, 20), (45.0, 10), (61.0, 30)):
      clock.now = now
      shown.update(count)
  # 40 done at 30 s: 1.33/s, 60 left -> 45 s; 80 done at 61 s: 1.31/s, 20 left -> 15 s.
  assert lines(caplog) == ["scoring: 40 / 100 examples (40%), 1.3 examples/s, ETA 0:00:45",
                           "scoring: 80 / 100 examples (80%), 1.3 examples/s, ETA 0:00:15"]


def test_work_shorter_than_the_interval_prints_nothing_and_unknown_totals_have_no_eta(caplog):
  caplog.set_level(logging.INFO, logger="t5xlike.progress")
  clock = Clock()
  with progress.Progress("caching t/train", stream=io.StringIO(), clock=clock) as shown:
    clock.now = 5.0
    shown.update(7)
  assert lines(caplog) == []
  assert shown.line(35.0) == "caching t/train: 7 examples, 0.2 examples/s"


def test_on_a_terminal_a_bar_and_no_log_line(caplog):
  caplog.set_level(logging.INFO, logger="t5xlike.progress")
  stream, clock = Terminal(), Clock()
  with progress.Progress("reading the checkpoint", 8, unit="tensors", stream=stream,
                         clock=clock) as shown:
    clock.now = 100.0
    shown.update(3)
    bar = shown._bar  # tqdm redraws at most every 0.1 s of real time: read its count.
    assert (bar.n, bar.total) == (3, 8)
  assert lines(caplog) == []
  assert "reading the checkpoint:   0%|" in stream.getvalue() and "0/8" in stream.getvalue()


def test_the_task_cache_writer_shows_its_progress(tmp_path, caplog, monkeypatch):
  caplog.set_level(logging.INFO, logger="t5xlike.progress")
  monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
  examples = [{"targets": np.arange(n + 1, dtype=np.int32)} for n in range(3)]
  stats = task_cache.write_examples("t", "train", examples, tmp_path, features={"targets": True},
                                    eos_features=["targets"], precache_preprocessors=[],
                                    total=3)
  assert stats["num_examples"] == 3
  assert [line.split(",")[0] for line in lines(caplog)] == [
      f"caching t/train: {i} / 3 examples ({round(100 * i / 3)}%)" for i in (1, 2, 3)]


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (3725, "1:02:05")])
def test_eta_is_hours_minutes_seconds(seconds, text):
  clock = Clock()
  shown = progress.Progress("x", 2, stream=io.StringIO(), clock=clock)
  clock.now = 10.0
  shown.update(1)
  # 1 done in 10 s: 0.1/s; the remaining 1 takes 10 s. Rescale the clock to get `seconds`.
  shown._start = clock.now - seconds
  assert shown.line().endswith(f"ETA {text}")


def test_disabled_progress_counts_and_shows_nothing(caplog, monkeypatch):
  caplog.set_level(logging.INFO, logger="t5xlike.progress")
  monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
  stream, clock = Terminal(), Clock()
  with progress.Progress("evaluating", 4, stream=stream, clock=clock, enabled=False) as shown:
    clock.now = 100.0
    shown.update(4)
  assert shown.done == 4 and shown._bar is None
  assert lines(caplog) == [] and stream.getvalue() == ""

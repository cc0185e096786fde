"""Progress of the long commands other than training (`cache_tasks`, `convert`, `eval`,
`infer`, `select_data`, `precompute_reference`).

On a terminal (the stream is a TTY): a tqdm bar with the count, the rate and,
when the total is known, the ETA; it disappears when done. Otherwise (a log
file, CI, a pipe): quiet, except for one log line every `LOG_EVERY_S`
seconds while the work lasts:

  scoring: 3,072 / 10,000 examples (31%), 412.5 examples/s, ETA 0:00:17

Work shorter than `LOG_EVERY_S` prints nothing. Training has its own
progress lines (`metrics.progress_line`).
"""
from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger(__name__)

#: Seconds between two log lines when the output is not a terminal.
LOG_EVERY_S = 30.0


def _is_terminal(stream: TextIO) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # A closed or stand-in stream.
    return False


class Progress:
  """Counts units of work done, shown as a bar on a terminal or a log line every
  `LOG_EVERY_S` seconds elsewhere. A context manager; `update(n)` after each piece.

  Args:
    description: what is being done ('scoring', 'caching task/train', ...).
    total: the units to do (None: unknown; no percentage, no ETA).
    unit: what a unit is ('examples', 'tensors').
    stream: where a bar is drawn (default stderr); a non-terminal stream means log lines.
    clock: seconds (monotonic); tests pass their own.
    enabled: False: counts only, shows nothing (a caller whose progress is optional).
  """

  def __init__(self, description: str, total: int | None = None, unit: str = "examples", *,
               stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
               enabled: bool = True):
    self.description, self.total, self.unit = description, total, unit
    self.done = 0
    self._clock = clock
    self._start = self._last_line = clock()
    self._bar: Any = None
    self._enabled = enabled
    stream = sys.stderr if stream is None else stream
    if enabled and _is_terminal(stream):
      import tqdm  # noqa: PLC0415  (only when a bar is drawn)
      self._bar = tqdm.tqdm(total=total, desc=description, unit=f" {unit}", file=stream,
                            leave=False, dynamic_ncols=True)

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def update(self, count: int = 1) -> None:
    """`count` more units done."""
    self.done += count
    if self._bar is not None:
      self._bar.update(count)
      return
    if not self._enabled:
      return
    now = self._clock()
    if now - self._last_line >= LOG_EVERY_S:
      self._last_line = now
      log.info("%s", self.line(now))

  def line(self, now: float | None = None) -> str:
    """'DESCRIPTION: DONE / TOTAL UNIT (P%), R UNIT/s, ETA H:MM:SS' (without total: no
    percentage and no ETA)."""
    elapsed = max((self._clock() if now is None else now) - self._start, 1e-9)
    rate = self.done / elapsed
    text = f"{self.description}: {self.done:,}"
    if self.total:
      text += f" / {self.total:,} {self.unit} ({100.0 * self.done / self.total:.0f}%)"
    else:
      text += f" {self.unit}"
    text += f", {rate:,.1f} {self.unit}/s"
    if self.total and rate > 0:
      remaining = max(self.total - self.done, 0) / rate
      text += f", ETA {datetime.timedelta(seconds=round(remaining))}"
    return text

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

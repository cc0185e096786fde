"""SIGTERM / SIGINT during training: finish the step, checkpoint, exit cleanly.

A preemption notice (SIGTERM from a scheduler or `kill`) or Ctrl-C (SIGINT)
only sets a flag; the training loop asks `PreemptionGuard.should_stop(step)`
after each step, and when it says so writes a checkpoint of that step (with
the data iterator's state), flushes the metrics and raises `Stopped`, which
the entry point turns into exit code 0 (SIGTERM) or 130 (SIGINT, the shell's
128 + 2). A second signal of the same kind while stopping restores the
default handler and re-raises it (a second Ctrl-C interrupts at once).

Multi-process runs: each process may receive the signal at a different
step, so `should_stop` all-gathers the flag over processes every step
(`jax.experimental.multihost_utils.process_allgather` of one int32: a few
microseconds on a cluster network) and every process stops at the same
step, so the collective checkpoint save is reached by all.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Exit codes of a run stopped by each signal.
EXIT_CODES: dict[int, int] = {signal.SIGTERM: 0, signal.SIGINT: 130}


class Stopped(Exception):
  """Raised once a signalled run has checkpointed; `exit_code` is what the process returns."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
    self.signum = signum
    self.step = step
    self.exit_code = EXIT_CODES.get(signum, 0)


class PreemptionGuard:
  """Context manager: catches SIGTERM and SIGINT while the training loop runs.

  Outside the main thread (signal handlers cannot be installed there) it
  installs nothing and `should_stop` only reflects `request_stop` calls.
  """

  def __init__(self, process_count: int = 1):
    self.process_count = process_count
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is threading.main_thread():
      for signum in EXIT_CODES:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame) -> None:
    if self.signum == signum:  # The second one: stop waiting for the step.
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      signal.raise_signal(signum)
      return
    self.request_stop(signum)

  def request_stop(self, signum: int = signal.SIGTERM) -> None:
    """What the signal handler does (also callable directly, e.g. by tests)."""
    if self.signum is None:
      log.warning("%s received: stopping after the current step with a checkpoint",
                  signal.Signals(signum).name)
      self.signum = signum

  def should_stop(self, step: int) -> bool:
    """True when any process was signalled; the same answer on every process."""
    del step  # Every process calls this at every step, so the steps agree.
    if self.process_count <= 1:
      return self.signum is not None
    # JAX is imported here: `cli.entry` imports this module (for `Stopped`) before the
    # flags are parsed, and `--help` stays free of JAX.
    from jax.experimental import multihost_utils  # noqa: PLC0415
    flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
    signalled = [int(f) for f in np.asarray(flags).reshape(-1) if int(f)]
    if signalled and self.signum is None:
      self.signum = signalled[0]  # Another process was signalled: stop with it.
    return bool(signalled)

  def stopped(self, step: int) -> Stopped:
    return Stopped(self.signum or signal.SIGTERM, step)

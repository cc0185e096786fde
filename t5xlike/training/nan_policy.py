"""What a training step with a NaN / Inf loss or gradient does (gin: `nan_policy.NanPolicy`).

Each jitted train step reports `nonfinite` (1 when the loss or the global
gradient norm is NaN or Inf, else 0). Policies:

* `'stop'` (default): the run ends with exit code 1 and one line naming the
  first bad step; that step's metrics row is written to `train.jsonl`;
  no checkpoint of a bad state is written (the check runs before each save).
* `'skip'`: the jitted step keeps the parameters and optimizer state of a bad
  step unchanged (`jnp.where` on the update, decided on the device); the
  step counter and the data still advance. Logged rows carry
  `skipped_steps` (bad steps since the run (re)started) and every bad step's
  row is written. With `nan_rollback_after=K`, K consecutive bad steps
  restore the last checkpoint's train state and continue with the data
  where it is (the batches that went bad are not replayed), at most
  `MAX_ROLLBACKS` times.

The flags are read once per log period (and before each checkpoint), in one
device-to-host transfer for the whole window, so the device never waits for
the host in between.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax

from t5xlike import errors

log = logging.getLogger(__name__)

POLICIES = ("stop", "skip")
MAX_ROLLBACKS = 3


class NonFiniteLoss(errors.RunError):
  """A NaN / Inf loss or gradient under the 'stop' policy (exit code 1, one line)."""


class RollBack(Exception):
  """K consecutive bad steps under `nan_rollback_after=K`: restore the last checkpoint."""

  def __init__(self, step: int, bad_steps: int):
    super().__init__(f"{bad_steps} consecutive non-finite steps up to step {step}")
    self.step = step


@dataclasses.dataclass(frozen=True)
class NanPolicy:
  """Validated `nan_policy` / `nan_rollback_after` of a run."""
  action: str = "stop"
  rollback_after: int | None = None

  def __post_init__(self):
    if self.action not in POLICIES:
      raise errors.ConfigError(f"nan_policy must be one of {POLICIES}, got {self.action!r}")
    if self.rollback_after is not None:
      errors.require_int("nan_rollback_after", self.rollback_after)
      if self.action != "skip":
        raise errors.ConfigError("nan_rollback_after needs nan_policy='skip'")

  @property
  def skip_in_step(self) -> bool:
    """Whether the jitted step must leave the state unchanged on a bad step."""
    return self.action == "skip"


class NonFiniteWatch:
  """Collects the steps of one log window and applies the policy to their flags.

  Args:
    policy: the run's `NanPolicy`.
    write_row: `write_row(step, values)` writes a train.jsonl row.
  """

  def __init__(self, policy: NanPolicy, write_row):
    self.policy = policy
    self.write_row = write_row
    self.skipped = 0  # Bad steps since this watch was made.
    self.consecutive = 0
    self._window: list[tuple[int, Mapping[str, Any]]] = []

  def add(self, step: int, step_metrics: Mapping[str, Any]) -> None:
    """Keeps the (device) metrics of a step just dispatched; nothing is read."""
    self._window.append((step, step_metrics))

  def check(self, logged_step: int | None = None) -> None:
    """Reads the window's flags (one transfer) and applies the policy.

    Rows of bad steps are written here, except `logged_step`'s (the loop
    writes that one). Raises NonFiniteLoss ('stop') or RollBack.
    """
    window, self._window = self._window, []
    if not window:
      return
    flags = jax.device_get([m["nonfinite"] for _, m in window])
    for (step, step_metrics), flag in zip(window, flags):
      if not int(flag):
        self.consecutive = 0
        continue
      self.skipped += 1
      self.consecutive += 1
      values = {k: float(v) for k, v in jax.device_get(dict(step_metrics)).items()
                if k != "nonfinite"}
      if self.policy.action == "skip":
        values["skipped_steps"] = self.skipped
      if step != logged_step or self.policy.action == "stop":  # (the loop writes its own)
        self.write_row(step, values)
      culprit = "loss" if values.get("loss") != values.get("loss") or abs(
          values.get("loss", 0.0)) == float("inf") else "gradient norm"
      if self.policy.action == "stop":
        raise NonFiniteLoss(
            f"{culprit} is {values.get('loss') if culprit == 'loss' else values.get('grad_norm')}"
            f" at step {step} (its metrics are in metrics/train.jsonl; "
            f"--gin.NAN_POLICY=skip skips such steps)")
      log.warning("step %d: non-finite %s: update skipped (%d skipped so far) | %s", step,
                  culprit, self.skipped, " | ".join(f"{k} {v:.4g}" for k, v in values.items()))
      if self.policy.rollback_after and self.consecutive >= self.policy.rollback_after:
        self.consecutive = 0
        raise RollBack(step, self.policy.rollback_after)

"""Run metrics: `metrics/{train,eval}.jsonl`, TensorBoard events, trackers, progress lines.

Only process 0 writes. Each JSONL line is one JSON object with `step`
first; TensorBoard scalars go to `MODEL_DIR/tensorboard/{train,eval}` through
tensorboardX (no TensorFlow needed); the selected experiment trackers
(`t5xlike.trackers`: W&B, MLflow) get the same numbers as `train/<metric>` and
`eval/<task>/<metric>` at the row's step.
"""
from __future__ import annotations

import datetime
import functools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from etils import epath

if TYPE_CHECKING:
  from t5xlike.trackers.tracker import Tracker

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf.
  return value


def _numbers(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
  """The numeric values of a row as {prefix + name: value} (NaN and Inf kept)."""
  numbers = {}
  for name, value in values.items():
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
      value = np.asarray(value).item()
    if isinstance(value, (int, float)):
      numbers[prefix + name] = value
  return numbers


class MetricsWriter:
  """Appends metrics rows to JSONL files, TensorBoard and the selected trackers.

  Args:
    model_dir: the run directory (`metrics/` and `tensorboard/` are created inside).
    enabled: False on every process but 0.
    trackers: experiment trackers, already open (`tracker.open_for`), that get every row
      and are closed by `close`.
  """

  def __init__(self, model_dir: str | epath.Path, enabled: bool = True,
               trackers: Sequence[Tracker] = ()):
    self.enabled = enabled
    self.trackers = list(trackers) if enabled else []
    self.dir = epath.Path(model_dir) / "metrics"
    self._tb = {}
    if enabled:
      self.dir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter  # noqa: PLC0415  (heavy, 0.8 s: process 0 only)
      for kind in ("train", "eval"):
        self._tb[kind] = SummaryWriter(str(epath.Path(model_dir) / "tensorboard" / kind))

  def _append(self, kind: str, row: Mapping[str, Any]) -> None:
    with (self.dir / f"{kind}.jsonl").open("a") as f:
      f.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")

  def write_train(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    self._append("train", {"step": step, **values})
    for name, value in values.items():
      if isinstance(_plain(value), (int, float)):
        self._tb["train"].add_scalar(name, _plain(value), step)
    self._tb["train"].flush()
    for tracker in self.trackers:
      tracker.log(step, _numbers("train/", values))

  def write_eval(self, step: int, task: str, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    self._append("eval", {"step": step, "task": task, **values})
    for name, value in values.items():
      if isinstance(_plain(value), (int, float)):
        self._tb["eval"].add_scalar(f"{task}/{name}", _plain(value), step)
    self._tb["eval"].flush()
    for tracker in self.trackers:
      tracker.log(step, _numbers(f"eval/{task}/", values))

  def rewind(self, step: int) -> None:
    """Drops the JSONL rows of steps after `step` (a resumed run re-runs them).

    Called when a run restarts from the checkpoint of `step` (after a crash
    or a preemption that logged steps past its last checkpoint), so that
    `train.jsonl` / `eval.jsonl` keep one row per (step, task). The file is
    rewritten through a temporary file renamed over it; a torn last line (the
    process killed while appending) is dropped too. TensorBoard events are
    not rewritten (TensorBoard shows the newest value of a repeated step); each
    tracker is told (`Tracker.rewind`: W&B keeps its first values of the re-run
    steps, MLflow appends the new ones).
    """
    if not self.enabled:
      return
    for tracker in self.trackers:
      tracker.rewind(step)
    for kind in ("train", "eval"):
      path = self.dir / f"{kind}.jsonl"
      if not path.exists():
        continue
      lines = path.read_text().splitlines()
      kept = []
      for line in lines:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
          kept.append(line)
      if len(kept) != len(lines):
        log.info("metrics/%s.jsonl: %d row(s) after step %d dropped (re-run from its "
                 "checkpoint)", kind, len(lines) - len(kept), step)
        temporary = self.dir / f".{kind}.jsonl.rewind"
        temporary.write_text("".join(line + "\n" for line in kept))
        temporary.replace(path)

  def close(self, failed: bool = False) -> None:
    """Closes the TensorBoard writers and the trackers (`failed`: the run stopped on an
    exception, which the trackers record)."""
    errors_seen: list[BaseException] = []
    for close in [*(w.close for w in self._tb.values()),
                  *(functools.partial(t.close, failed=failed) for t in self.trackers)]:
      try:  # (every writer and tracker is closed even when one of them fails)
        close()
      except Exception as error:  # noqa: BLE001  (re-raised below, after the others)
        errors_seen.append(error)
    if errors_seen:
      raise errors_seen[0]


def write_eval_rows(output_dir: str | epath.Path, step: int,
                    rows: Mapping[str, Mapping[str, Any]], command: str,
                    trackers: Sequence[Tracker] = ()) -> None:
  """The rows of an evaluation command (`eval`, `lm_eval`): one per task appended to
  OUTPUT_DIR/metrics/eval.jsonl, TensorBoard and the open `trackers` (process 0 only), each
  logged as `COMMAND step N TASK | metric value | ...`. The trackers record a failed run
  if writing fails."""
  writer = MetricsWriter(output_dir, enabled=jax.process_index() == 0, trackers=trackers)
  failed = True
  try:
    for task, values in rows.items():
      writer.write_eval(step, task, values)
      log.info("%s step %d %s | %s", command, step, task, " | ".join(
          f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float) and math.isfinite(v)))
    failed = False
  finally:
    writer.close(failed=failed)


def format_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def progress_line(step: int, total: int, values: Mapping[str, Any], eta_s: float | None) -> str:
  """One human-readable line: step, loss, accuracy, tokens/s, step time, ETA."""
  eta = "..." if eta_s is None else format_duration(eta_s)
  return (f"step {step}/{total} | loss {values['loss']:.4f} | acc {values['accuracy']:.3f} | "
          f"{values['tokens_per_second']:,.0f} tok/s | {values['step_time_s']:.3f} s/step | "
          f"lr {values['learning_rate']:.2e} | ETA {eta}")

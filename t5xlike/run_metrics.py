"""A run's metrics read back: `MODEL_DIR/metrics/{train,eval}.jsonl` as series per metric.

The rows are the ones `t5xlike.metrics.MetricsWriter` appends: one JSON object
per logged train step (`step`, `loss`, `accuracy`, `learning_rate`,
`tokens_per_second`, `step_time_s`, ...) and one per evaluated task and step
(`step`, `task`, `loss`, `accuracy`, ...). A line that is not a JSON object
with an integer `step` (the torn last line of a run killed while appending, or
of a run being read while it writes) is skipped; so is a row's value that is
not a number (`"nan"` and `"inf"`, JSON's spelling of non-finite values, read
as floats).

Tokens seen: the rows hold no cumulative count. Every train step consumes one
global batch of `tokens_per_step` token positions (inputs + targets x rows,
padding included, all processes: `feature_converters.tokens_per_batch`), and
each train row logs `tokens_per_second = tokens_per_step / step_time_s`; so
`tokens_per_step = round(tokens_per_second x step_time_s)` (the median over the
train rows), and the tokens seen after step s are s x tokens_per_step, for
train and eval rows alike. Standard library and NumPy only.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import numpy as np

from t5xlike import errors

KINDS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Series:
  """One metric of one kind of row: `steps` [n] int64, `values` [n] float64, by step.

  `task` names the evaluated task of an eval series (None for train).
  """
  metric: str
  kind: str
  task: str | None
  steps: np.ndarray
  values: np.ndarray


@dataclasses.dataclass(frozen=True)
class RunMetrics:
  """The rows of one run; `rows[kind]` in file order (kind: "train" or "eval")."""
  model_dir: str
  rows: dict[str, list[dict[str, Any]]]

  @property
  def metric_names(self) -> set[str]:
    """Every numeric key of any row but `step` (train and eval alike)."""
    return {key for kind in KINDS for row in self.rows[kind] for key, value in row.items()
            if key != "step" and _number(value) is not None}

  @property
  def tokens_per_step(self) -> int | None:
    """Token positions per train step, from the train rows (None: no row tells)."""
    products = [t * s for row in self.rows["train"]
                if (t := _number(row.get("tokens_per_second"))) is not None
                and (s := _number(row.get("step_time_s"))) is not None
                and math.isfinite(t * s) and t * s > 0]
    return int(round(float(np.median(products)))) if products else None

  def series(self, kind: str, metric: str) -> list[Series]:
    """`metric`'s series of `kind` rows: one for train, one per task for eval (sorted
    by task name); rows without the metric are left out, empty series are not returned."""
    tasks = sorted({row.get("task", "") for row in self.rows[kind]}) if kind == "eval" else [None]
    found = []
    for task in tasks:
      points = [(row["step"], value) for row in self.rows[kind]
                if (task is None or row.get("task", "") == task)
                and (value := _number(row.get(metric))) is not None]
      if points:
        steps, values = zip(*points)
        found.append(Series(metric, kind, task, np.asarray(steps, np.int64),
                            np.asarray(values, np.float64)))
    return found


def _number(value: Any) -> float | None:
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
    return float(value)
  return None


def _read_rows(path: pathlib.Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), int):
      rows.append(row)
  return rows


def read(model_dir: str | pathlib.Path) -> RunMetrics:
  """The rows of `model_dir/metrics/{train,eval}.jsonl`.

  Raises:
    errors.ConfigError: neither file holds a row (not a run directory, or a run
      that has not logged yet).
  """
  directory = pathlib.Path(model_dir) / "metrics"
  rows = {kind: _read_rows(directory / f"{kind}.jsonl") for kind in KINDS}
  if not any(rows.values()):
    raise errors.ConfigError(f"{model_dir}: no metrics (no rows in "
                             f"{directory}/train.jsonl or eval.jsonl)")
  return RunMetrics(str(model_dir), rows)

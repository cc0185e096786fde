"""Train and eval curves of runs: one panel per metric, one colour per run, a PNG.

`plan` reads and checks everything (no file written); `figure` draws it; `write`
saves the PNG. In each panel a run's train series is a solid line, its eval
series dashed with markers (one line per evaluated task, one marker shape per
task name), both in the run's colour, labelled `LABEL train`, `LABEL eval`
(`LABEL eval TASK` when a run evaluated several tasks). A panel of at most
LEGEND_MAX_LINES lines has its own legend; when any panel has more (runs that
evaluate several tasks each), one key below the panels names each run's colour,
the train and eval line styles and each task's marker instead. By step, or by
tokens seen (`run_metrics`: step x the run's token positions per step).
matplotlib is imported when drawing (`Figure` with the Agg canvas: no pyplot, no
display, no global state).
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from t5xlike import errors, run_metrics

if TYPE_CHECKING:
  from matplotlib.figure import Figure

DEFAULT_METRICS = ("loss", "accuracy", "learning_rate", "tokens_per_second")
X_AXES = ("step", "tokens")
PANEL_INCHES = (5.0, 3.2)  # width, height of one panel
COLUMNS = 2  # panels per row (fewer when fewer metrics)
DPI = 90  # the PNG: COLUMNS x 5 in x 90 = 900 px wide, 3.2 in x 90 = 288 px per row
INSTALL_HINT = "matplotlib is not installed: pip install 't5xlike[plot]'"
LEGEND_MAX_LINES = 8  # more lines in a panel: one key below the panels instead
KEY_COLUMNS = 2  # entries per row of that key, per column of panels
KEY_ROW_INCHES = 0.25  # the figure's height grows by this per row of the key
MARKERS = "os^vDPX*<>ph"  # eval series: the marker of the i-th task name (cycled)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What to draw: the runs, their labels, the metrics (one panel each), the x axis."""
  runs: list[run_metrics.RunMetrics]
  labels: list[str]
  metrics: list[str]
  x: str

  @property
  def grid(self) -> tuple[int, int]:
    """(rows, columns) of panels: at most COLUMNS per row."""
    columns = min(COLUMNS, len(self.metrics))
    return math.ceil(len(self.metrics) / columns), columns

  @property
  def eval_tasks(self) -> list[str]:
    """The task names of the eval series drawn, sorted (task i gets MARKERS[i])."""
    return sorted({series.task or "" for run in self.runs for metric in self.metrics
                   for series in run.series("eval", metric)})

  @property
  def key_entries(self) -> list[str]:
    """The labels of the key below the panels ([] when every panel has its own legend):
    the runs' labels, 'train', then 'eval' or 'eval TASK' per task."""
    most = max(sum(len(run.series(kind, metric)) for run in self.runs for kind in
                   run_metrics.KINDS) for metric in self.metrics)
    if most <= LEGEND_MAX_LINES:
      return []
    tasks = self.eval_tasks
    evals = ["eval"] if len(tasks) == 1 else [f"eval {task}" for task in tasks]
    return [*self.labels, "train", *evals]

  @property
  def key_inches(self) -> float:
    """The height added below the panels for the key."""
    return math.ceil(len(self.key_entries) / self.key_columns) * KEY_ROW_INCHES

  @property
  def key_columns(self) -> int:
    """Entries per row of the key (it spans the figure's width)."""
    return KEY_COLUMNS * self.grid[1]

  @property
  def size_px(self) -> tuple[int, int]:
    """The PNG's (width, height) in pixels."""
    rows, columns = self.grid
    return (round(columns * PANEL_INCHES[0] * DPI),
            round((rows * PANEL_INCHES[1] + self.key_inches) * DPI))


def plan(model_dirs: Sequence[str], output: str, metrics: Sequence[str] | None = None,
         x: str = "step", labels: Sequence[str] | None = None) -> Plan:
  """Reads the runs and checks the request; writes nothing.

  Args:
    model_dirs: run directories (each with `metrics/train.jsonl` and/or `eval.jsonl`).
    output: the PNG's path (its directory must exist; the name ends in `.png`).
    metrics: row keys, one panel each; None: `DEFAULT_METRICS` that any run logged.
    x: "step" or "tokens" (tokens seen: step x token positions per step).
    labels: one name per run; None: each directory's name.

  Raises:
    errors.ConfigError: no run, a directory without metrics rows, an unknown metric
      (one no run logged), an unknown x axis, a count of labels that is not the
      count of runs, an output that is not a `.png` in an existing directory, or
      `--x=tokens` for a run whose train rows do not tell its tokens per step.
  """
  if not model_dirs:
    raise errors.ConfigError("no MODEL_DIR given (python -m t5xlike.plot MODEL_DIR [...] "
                             "--output=FILE.png)")
  if x not in X_AXES:
    raise errors.ConfigError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
  if labels is not None and len(labels) != len(model_dirs):
    raise errors.ConfigError(f"--labels names {len(labels)} run(s) for {len(model_dirs)} "
                             "MODEL_DIR(s)")
  out = pathlib.Path(output)
  if out.suffix.lower() != ".png":
    raise errors.ConfigError(f"--output must name a .png file, got {output!r}")
  if not out.parent.is_dir():
    raise errors.ConfigError(f"--output: directory {str(out.parent)!r} does not exist")
  runs = [run_metrics.read(model_dir) for model_dir in model_dirs]
  logged = set().union(*(run.metric_names for run in runs))
  if metrics is None:
    metrics = [name for name in DEFAULT_METRICS if name in logged]
  unknown = [name for name in metrics if name not in logged]
  if unknown or not metrics:
    raise errors.ConfigError(
        f"unknown metric(s) {', '.join(unknown) or '(none given)'}: the runs logged "
        f"{', '.join(sorted(logged))}")
  if x == "tokens":
    for run in runs:
      if run.tokens_per_step is None:
        raise errors.ConfigError(f"{run.model_dir}: --x=tokens needs train rows with "
                                 "tokens_per_second and step_time_s")
  names = list(labels) if labels is not None else [
      pathlib.Path(d).resolve().name or str(d) for d in model_dirs]
  return Plan(runs, names, list(metrics), x)


def x_values(run: run_metrics.RunMetrics, steps: np.ndarray, x: str) -> np.ndarray:
  """The x coordinates of `steps` [n]: the steps, or the tokens seen after them [n] int64."""
  if x == "tokens":
    return steps.astype(np.int64) * np.int64(run.tokens_per_step or 0)
  return steps


def figure(p: Plan) -> Figure:
  """The figure of `p`: panel i (`figure.axes[i]`) is `p.metrics[i]`; its lines are, per
  run in order, the train series then the eval series (each with its label)."""
  try:
    from matplotlib.figure import Figure  # noqa: PLC0415  (optional dependency, 0.3 s)
  except ImportError:
    raise errors.ConfigError(INSTALL_HINT) from None
  rows, columns = p.grid
  fig = Figure(figsize=(columns * PANEL_INCHES[0], rows * PANEL_INCHES[1] + p.key_inches),
               dpi=DPI, layout="constrained")
  markers = {task: MARKERS[i % len(MARKERS)] for i, task in enumerate(p.eval_tasks)}
  key = p.key_entries
  axes = fig.subplots(rows, columns, squeeze=False).flatten()
  for extra in axes[len(p.metrics):]:
    fig.delaxes(extra)
  for ax, metric in zip(axes, p.metrics):
    for index, (run, label) in enumerate(zip(p.runs, p.labels)):
      colour = f"C{index % 10}"
      for series in run.series("train", metric):
        ax.plot(x_values(run, series.steps, p.x), series.values, "-", color=colour,
                linewidth=1.2, label=f"{label} train")
      evals = run.series("eval", metric)
      for series in evals:
        name = f"{label} eval" + (f" {series.task}" if len(evals) > 1 else "")
        ax.plot(x_values(run, series.steps, p.x), series.values, "--", color=colour,
                marker=markers[series.task or ""], linewidth=1.0, markersize=4, label=name)
    ax.set_title(metric, fontsize=10)
    ax.set_xlabel("tokens seen (positions, padding included)" if p.x == "tokens" else "step",
                  fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if ax.get_lines() and not key:
      ax.legend(fontsize=7)
  if key:
    _draw_key(fig, p, markers)
  return fig


def _draw_key(fig: Figure, p: Plan, markers: dict[str, str]) -> None:
  """The key below the panels: a solid line in each run's colour, then the styles."""
  from matplotlib.lines import Line2D  # noqa: PLC0415  (optional dependency)
  handles = [Line2D([], [], color=f"C{i % 10}", linewidth=2) for i in range(len(p.runs))]
  handles.append(Line2D([], [], color="0.3", linestyle="-"))
  handles += [Line2D([], [], color="0.3", linestyle="--", marker=markers[task], markersize=4)
              for task in p.eval_tasks]
  fig.legend(handles, p.key_entries, loc="outside lower center", ncols=p.key_columns,
             fontsize=7, frameon=False)


def write(p: Plan, output: str) -> Figure:
  """Draws `p` and saves it as the PNG `output`; returns the figure."""
  fig = figure(p)
  fig.savefig(output, format="png", dpi=DPI)
  return fig

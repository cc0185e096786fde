"""Weights & Biases as a tracker of a training run (`gin_configs/trackers/wandb.gin`).

One W&B run per MODEL_DIR: its id is kept in `MODEL_DIR/trackers/wandb.json`, and a
restarted run resumes it (`resume="allow"`). Rows are logged with `step=` the training
step; the run's config is the operative gin as flat parameters, and `config.gin` and
`plan.txt` are saved as the run's files. With `mode="offline"` (or WANDB_MODE=offline)
nothing leaves the machine: the run is written to `MODEL_DIR/wandb/offline-run-*-<id>/`
(`run-<id>.wandb` and `files/`), which `wandb sync` uploads later.

Steps of a W&B run only go forward (W&B drops a row of a step below its newest one),
so after a rewind (`MetricsWriter.rewind`: a NaN rollback; or a resume, where W&B
itself drops the steps it already has) the rows of the steps already logged are not
sent again: W&B keeps their first values, and rows resume with the first new step.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from t5xlike import errors
from t5xlike.trackers.tracker import TrackedRun, Tracker

log = logging.getLogger(__name__)

MODES = (None, "online", "offline", "disabled")


class WandbTracker(Tracker):
  """Logs the run's rows to Weights & Biases.

  Args:
    project: the W&B project.
    entity: the W&B team or user (None: the default of the logged-in account).
    name: the run's display name (None: MODEL_DIR's last component).
    group: the W&B group of the run (None: none).
    tags: the run's tags.
    mode: 'online', 'offline' (written to disk only), 'disabled', or None: W&B's
      default (WANDB_MODE, else online).
    directory: the directory W&B writes its `wandb/` folder in (None: MODEL_DIR when it is
      local, else W&B's default, the current directory).
    settings: more `wandb.Settings` fields, e.g. {'console': 'off'}.
  """

  name = "wandb"

  def __init__(self, project: str = "t5xlike", entity: str | None = None,
               name: str | None = None, group: str | None = None, tags: Sequence[str] = (),
               mode: str | None = None, directory: str | None = None,
               settings: Mapping[str, Any] | None = None):
    try:
      import wandb  # noqa: PLC0415  (optional, imported only when selected)
    except ImportError:
      raise errors.ConfigError("WandbTracker: wandb is not installed "
                               "(pip install 't5xlike[wandb]')") from None
    if mode not in MODES:
      raise errors.ConfigError(f"WandbTracker.mode must be one of {MODES}, got {mode!r}")
    self._wandb = wandb
    self.project, self.entity, self.run_name, self.group = project, entity, name, group
    self.tags, self.mode, self.directory = list(tags), mode, directory
    self.settings = dict(settings or {})
    self._run: Any = None
    self._newest: int | None = None  # The newest step logged by this process.
    self._skip_through = -1  # Steps up to this one are W&B's already (after a rewind).

  def open(self, run: TrackedRun) -> None:
    state = run.load_state(self.name)
    run_id = state["run_id"] if state else uuid.uuid4().hex[:12]
    directory = self.directory if self.directory is not None else run.local_dir
    self._run = self._wandb.init(
        project=self.project, entity=self.entity, name=self.run_name or run.name,
        group=self.group, tags=self.tags, mode=self.mode,  # type: ignore[arg-type]
        dir=None if directory is None else str(directory), id=run_id, resume="allow",
        config=dict(run.params), allow_val_change=True, reinit="create_new",
        settings=self._wandb.Settings(**self.settings))
    run.save_state(self.name, {"run_id": run_id, "project": self.project})
    if self._run.disabled:  # (mode='disabled': no run directory to save files in)
      return
    files_dir = self._run.dir
    for file_name, text in run.files.items():
      path = f"{files_dir}/{file_name}"
      with open(path, "w") as f:
        f.write(text)
      self._run.save(path, base_path=files_dir, policy="now")

  def log(self, step: int, values: Mapping[str, float]) -> None:
    if step <= self._skip_through:
      return
    self._run.log(dict(values), step=step)
    self._newest = step if self._newest is None else max(self._newest, step)

  def rewind(self, step: int) -> None:
    if self._newest is not None and self._newest > step:
      self._skip_through = max(self._skip_through, self._newest)
      log.info("W&B keeps its rows of steps %d-%d (a W&B run's steps only go forward): "
               "logging again from step %d", step + 1, self._newest, self._newest + 1)

  def close(self, failed: bool = False) -> None:
    if self._run is not None:
      self._run.finish(exit_code=1 if failed else 0)
      self._run = None

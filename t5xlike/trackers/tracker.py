"""The experiment-tracker interface, the run a tracker records, and the gin selection.

A training run's `metrics.MetricsWriter` hands every row it appends to
`metrics/{train,eval}.jsonl` to the selected trackers too, as `{name: number}` with
the names TensorBoard shows: `train/<metric>`, `eval/<task>/<metric>`. Only process 0
opens trackers. Gin selects them (`gin_configs/trackers/*.gin`), each file adding one
keyword of `selected`, so that files compose in any order:

    train_run.train.trackers = @tracker.selected()
    tracker.selected.wandb = @wandb_tracker.WandbTracker()
"""
from __future__ import annotations

import abc
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from etils import epath

from t5xlike import errors
from t5xlike.trackers import gin_params

log = logging.getLogger(__name__)

#: Where trackers keep what a resumed run needs (their run ids), under MODEL_DIR.
STATE_DIR = "trackers"


@dataclasses.dataclass(frozen=True)
class TrackedRun:
  """What a tracker records about the run besides its rows.

  Attributes:
    model_dir: MODEL_DIR.
    params: the operative gin as flat parameters (`gin_params.flat`): the run's config.
    files: files attached to the tracker's run, {file name: text} (`config.gin`, the
      operative gin, and `plan.txt`), rewritten at every start as in MODEL_DIR.
  """
  model_dir: epath.Path
  params: Mapping[str, Any]
  files: Mapping[str, str]

  @property
  def name(self) -> str:
    """The default run name of every tracker: MODEL_DIR's last component."""
    return self.model_dir.name

  @property
  def local_dir(self) -> epath.Path | None:
    """MODEL_DIR when it is a local directory (None for gs:// and other remote paths)."""
    return None if "://" in str(self.model_dir) else self.model_dir

  def load_state(self, tracker: str) -> dict[str, Any] | None:
    """What `save_state` kept for `tracker` at an earlier start (None: nothing)."""
    path = self.model_dir / STATE_DIR / f"{tracker}.json"
    return json.loads(path.read_text()) if path.exists() else None

  def save_state(self, tracker: str, state: Mapping[str, Any]) -> None:
    """Keeps `state` (JSON) in `MODEL_DIR/trackers/<tracker>.json` for the next start."""
    directory = self.model_dir / STATE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{tracker}.json").write_text(json.dumps(dict(state), indent=1) + "\n")


class Tracker(abc.ABC):
  """A writer of the run's metrics rows to an experiment tracker.

  The constructor (called by gin when the run is configured) imports the tracker's
  library, so that a missing one is a ConfigError before anything is written; `open`
  starts or resumes the tracker's run on process 0.
  """

  #: The tracker's name: its keyword in `selected`, its state file under MODEL_DIR/trackers.
  name: str

  @abc.abstractmethod
  def open(self, run: TrackedRun) -> None:
    """Starts (or, for a MODEL_DIR it has tracked before, resumes) the tracker's run with
    the run's config and files attached."""

  @abc.abstractmethod
  def log(self, step: int, values: Mapping[str, float]) -> None:
    """Records one row: {`train/<metric>` or `eval/<task>/<metric>`: value} at `step`."""

  @abc.abstractmethod
  def rewind(self, step: int) -> None:
    """The run goes back to the checkpoint of `step` (a resume or a NaN rollback): the
    steps after it are trained and logged again."""

  @abc.abstractmethod
  def close(self, failed: bool = False) -> None:
    """Ends the tracker's run (`failed`: the run stopped on an exception)."""


def selected(**trackers: Tracker | None) -> list[Tracker]:
  """The trackers gin selected, ordered by keyword (None: deselected, e.g.
  `--gin.selected.wandb=None`)."""
  return [tracker for _, tracker in sorted(trackers.items()) if tracker is not None]


def checked(trackers: Sequence[Tracker], where: str) -> tuple[Tracker, ...]:
  """`trackers` (the gin argument `where`) as a tuple; a ConfigError when it is not a list
  of `Tracker`s."""
  if isinstance(trackers, (str, bytes)) or not isinstance(trackers, Sequence):
    raise errors.ConfigError(f"{where} must be a list of trackers (@tracker.selected()), "
                             f"got {trackers!r}")
  for tracker in trackers:
    if not isinstance(tracker, Tracker):
      raise errors.ConfigError(f"{where}: {tracker!r} is not a tracker "
                               f"(t5xlike.trackers: WandbTracker, MlflowTracker)")
  return tuple(trackers)


def open_for(trackers: Sequence[Tracker], model_dir: str | epath.Path,
             read_files: Callable[[], Mapping[str, str]]) -> list[Tracker]:
  """`trackers` opened (`open_all`) for the run of `model_dir` on process 0; [] elsewhere
  or when none is selected. `read_files()` (called only then) gives the files to attach,
  {name: text}, among them `config.gin`, the operative gin, whose bindings are the run's
  parameters (`gin_params.flat`)."""
  if not trackers or jax.process_index() != 0:
    return []
  files = read_files()
  run = TrackedRun(model_dir=epath.Path(model_dir), params=gin_params.flat(files["config.gin"]),
                   files=files)
  return open_all(trackers, run)


def open_all(trackers: Sequence[Tracker], run: TrackedRun) -> list[Tracker]:
  """Opens every tracker for `run`; if one fails, closes those already open (as failed)
  and raises."""
  opened: list[Tracker] = []
  try:
    for tracker in trackers:
      tracker.open(run)
      opened.append(tracker)
      log.info("tracking the run with %s", tracker.name)
  except BaseException:
    for tracker in opened:
      tracker.close(failed=True)
    raise
  return opened

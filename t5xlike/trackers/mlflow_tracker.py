"""MLflow as a tracker of a training run (`gin_configs/trackers/mlflow.gin`).

One MLflow run per MODEL_DIR, in the experiment `experiment_name` (created when
absent): its id is kept in `MODEL_DIR/trackers/mlflow.json`, and a restarted run
resumes it. Rows are metrics at their training step (`log_batch`); the run's config
is the operative gin as flat parameters (`param_name`; a resumed run adds the new
names, MLflow refuses to change a logged value), and `config.gin` and `plan.txt` are
artifacts (rewritten at every start). The run ends FINISHED, or FAILED when training
stopped on an exception.

Tracking URI: `tracking_uri`, else MLFLOW_TRACKING_URI, else the local file store
`MODEL_DIR/mlruns` (`mlflow ui --backend-store-uri MODEL_DIR/mlruns` shows it).
MLflow 3 keeps its file store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE=true,
which this tracker sets for a `file:` URI unless it is set otherwise (the sqlite
store, MLflow's default, needs SQLAlchemy, which `mlflow-skinny` does not install).

MLflow's metric history is append-only: after a rewind (a resume or a NaN rollback)
the re-run steps get a second value, logged later than the first; the newest value
of each step is the one `metrics/train.jsonl` holds.
"""
from __future__ import annotations

import os
import re
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from t5xlike import errors
from t5xlike.trackers.tracker import TrackedRun, Tracker

#: MLflow's longest parameter value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
MAX_PARAM_LENGTH = 6000


def metric_name(name: str) -> str:
  """`name` with the characters MLflow refuses in a metric or parameter name (all but
  letters, digits, `_ - . / :` and spaces) replaced by `_`."""
  return re.sub(r"[^\w\-./: ]", "_", name)


def param_name(name: str) -> str:
  """A flat gin parameter's name as an MLflow parameter name: `metric_name`, with gin's
  scope separator `/` as `:` (the file store keeps each parameter in a file of that
  path, and a scope is often a parameter too: `MODEL`, `MODEL/...EncoderDecoderModel.z_loss`)."""
  return metric_name(name).replace("/", ":")


def param_value(value: Any) -> str:
  """A flat gin parameter as MLflow's string: a str as is, anything else as its repr;
  cut to MAX_PARAM_LENGTH characters."""
  text = value if isinstance(value, str) else repr(value)
  return text if len(text) <= MAX_PARAM_LENGTH else text[:MAX_PARAM_LENGTH - 3] + "..."


class MlflowTracker(Tracker):
  """Logs the run's rows to MLflow.

  Args:
    tracking_uri: where the runs are kept (a server's http(s):// URI, `file:` or a
      `databricks` URI; None: MLFLOW_TRACKING_URI, else `MODEL_DIR/mlruns`).
    experiment_name: the experiment of the run (created when absent).
    run_name: the run's name (None: MODEL_DIR's last component).
    tags: the run's tags, {name: value}.
  """

  name = "mlflow"

  def __init__(self, tracking_uri: str | None = None, experiment_name: str = "t5xlike",
               run_name: str | None = None, tags: Mapping[str, str] | None = None):
    try:
      from mlflow import entities  # noqa: PLC0415  (optional, imported only when selected)
      from mlflow.tracking import MlflowClient  # noqa: PLC0415  (as above)
    except ImportError:
      raise errors.ConfigError("MlflowTracker: mlflow is not installed "
                               "(pip install 't5xlike[mlflow]')") from None
    self._entities, self._client_class = entities, MlflowClient
    self.tracking_uri, self.experiment_name = tracking_uri, experiment_name
    self.run_name, self.tags = run_name, dict(tags or {})
    self._client: Any = None
    self.run_id: str | None = None

  def _uri(self, run: TrackedRun) -> str:
    uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
      if run.local_dir is None:
        raise errors.ConfigError(f"MlflowTracker: MODEL_DIR={run.model_dir} is not local: set "
                                 f"MlflowTracker.tracking_uri or MLFLOW_TRACKING_URI")
      uri = (run.local_dir / "mlruns").resolve().as_uri()
    if urllib.parse.urlparse(uri).scheme in ("", "file"):
      os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # (module docstring)
    return uri

  def open(self, run: TrackedRun) -> None:
    uri = self._uri(run)
    client = self._client = self._client_class(tracking_uri=uri)
    state = run.load_state(self.name)
    existing: dict[str, str] = {}
    if state and state.get("tracking_uri") == uri:
      self.run_id = state["run_id"]
      existing = dict(client.get_run(self.run_id).data.params)
      client.update_run(self.run_id, status="RUNNING")
    else:
      experiment = client.get_experiment_by_name(self.experiment_name)
      experiment_id = (client.create_experiment(self.experiment_name) if experiment is None
                       else experiment.experiment_id)
      self.run_id = client.create_run(experiment_id, run_name=self.run_name or run.name,
                                      tags=self.tags).info.run_id
    run.save_state(self.name, {"run_id": self.run_id, "tracking_uri": uri})
    params = [self._entities.Param(param_name(k), param_value(v))
              for k, v in run.params.items() if param_name(k) not in existing]
    client.log_batch(self.run_id, params=params)
    for file_name, text in run.files.items():
      client.log_text(self.run_id, text, file_name)

  def log(self, step: int, values: Mapping[str, float]) -> None:
    timestamp = int(time.time() * 1000)
    self._client.log_batch(self.run_id, metrics=[
        self._entities.Metric(metric_name(k), float(v), timestamp, step)
        for k, v in values.items()])

  def rewind(self, step: int) -> None:
    """Nothing: the re-run steps are logged again (module docstring)."""

  def close(self, failed: bool = False) -> None:
    if self._client is not None and self.run_id is not None:
      self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
      self._client = None

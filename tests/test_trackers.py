"""W&B (offline) and MLflow (a local file store) as trackers of a training run, selected by
gin: what they logged, read back (W&B's transaction log, MlflowClient), equals
metrics/{train,eval}.jsonl at every step, with the operative gin as the run's config and
config.gin / plan.txt attached; resume and rewind; neither library imported unless
selected."""
import json
import math
import pathlib
import subprocess
import sys

import gin
import pytest

from t5xlike import errors, eval as eval_command, train
from t5xlike.trackers import gin_params, mlflow_tracker, tracker, wandb_tracker
from tests import wandb_offline_log

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--gin_file=gin_configs/quickstart.gin", "--gin.BATCH_SIZE=2",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.LOG_PERIOD=1",
         "--gin.CHECKPOINT_PERIOD=100", "--gin.CheckpointConfig.async_save=False"]
TRACKERS = ["--gin_file=trackers/wandb.gin", "--gin_file=trackers/mlflow.gin"]
# No network: W&B writes its offline run, MLflow its file store under MODEL_DIR.
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_ALLOW_FILE_STORE": "true"}


def rows(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def expected_by_step(model_dir: pathlib.Path) -> dict[int, dict[str, float]]:
  """{step: {train/<metric> or eval/<task>/<metric>: value}} of the run's JSONL rows."""
  out: dict[int, dict[str, float]] = {}
  for row in rows(model_dir / "metrics" / "train.jsonl"):
    out.setdefault(row["step"], {}).update(
        {f"train/{k}": v for k, v in row.items() if k != "step"})
  for row in rows(model_dir / "metrics" / "eval.jsonl"):
    out.setdefault(row["step"], {}).update(
        {f"eval/{row['task']}/{k}": v for k, v in row.items() if k not in ("step", "task")})
  return out


@pytest.fixture()
def offline(monkeypatch):
  for name, value in OFFLINE.items():
    monkeypatch.setenv(name, value)
  monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> pathlib.Path:
  """A 3-step run with both trackers (train rows 1-3, evaluations at steps 2 and 3)."""
  model_dir = tmp_path_factory.mktemp("tracked")
  with pytest.MonkeyPatch.context() as patch:
    for name, value in OFFLINE.items():
      patch.setenv(name, value)
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert train.main([*SMALL, *TRACKERS, f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=3",
                       "--gin.EVAL_PERIOD=2", "--gin.EVAL_STEPS=1"]) == 0
  return model_dir


def mlflow_client(model_dir: pathlib.Path):
  from mlflow.tracking import MlflowClient  # (its import is part of what is tested)
  return MlflowClient(tracking_uri=(model_dir / "mlruns").as_uri())


def mlflow_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
  """(step, value) of each logged value, in the order logged (the file store's)."""
  return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_wandb_offline_run_holds_every_row_config_and_files(tracked):
  [run_dir] = (tracked / "wandb").glob("offline-run-*")
  run = wandb_offline_log.read(run_dir)
  expected = expected_by_step(tracked)
  assert sorted(expected) == [1, 2, 3] and "eval/embedded_corpus/loss" in expected[2]
  assert run.history == expected  # every metric of every row, at its step, bit for bit
  assert run.run_id == json.loads((tracked / "trackers" / "wandb.json").read_text())["run_id"]
  config_gin = (tracked / "config.gin").read_text()
  assert run.config == json.loads(json.dumps(gin_params.flat(config_gin)))
  assert run.config["TRAIN_STEPS"] == 3 and run.config["MODEL_DIR"] == str(tracked)
  assert run.config["train_run.train.trackers"] == "@tracker.selected()"
  assert {"config.gin", "plan.txt"} <= set(run.saved_files)
  assert (run_dir / "files" / "config.gin").read_text() == config_gin
  assert (run_dir / "files" / "plan.txt").read_text() == (tracked / "plan.txt").read_text()
  assert run.exit_code == 0


def test_mlflow_run_holds_every_row_params_and_artifacts(tracked, offline):
  client = mlflow_client(tracked)
  run_id = json.loads((tracked / "trackers" / "mlflow.json").read_text())["run_id"]
  run = client.get_run(run_id)
  assert run.info.run_name == tracked.name and run.info.status == "FINISHED"
  assert client.get_experiment(run.info.experiment_id).name == "t5xlike"
  expected = expected_by_step(tracked)
  for key in set().union(*expected.values()):
    assert mlflow_history(client, run_id, key) == [
        (step, values[key]) for step, values in sorted(expected.items()) if key in values], key
  params = run.data.params
  flat = gin_params.flat((tracked / "config.gin").read_text())
  assert params == {mlflow_tracker.param_name(k): mlflow_tracker.param_value(v)
                    for k, v in flat.items()}
  assert params["TRAIN_STEPS"] == "3" and params["MODEL_DIR"] == str(tracked)
  assert params["MODEL:encoder_decoder.EncoderDecoderModel.z_loss"] == "0.0001"
  for name in ("config.gin", "plan.txt"):
    path = pathlib.Path(client.download_artifacts(run_id, name))
    assert path.read_text() == (tracked / name).read_text()


def test_eval_command_logs_its_rows_to_the_tracker_of_eval_output_dir(tracked, tmp_path,
                                                                       offline):
  """`python -m t5xlike.eval` with trackers/mlflow.gin: each task's row of
  EVAL_OUTPUT_DIR/metrics/eval.jsonl at the checkpoint's step, the operative gin attached."""
  out = tmp_path / "eval"
  assert eval_command.main([
      "--gin_file=models/t5_1_1/tiny.gin", "--gin_file=runs/eval.gin",
      "--gin_file=trackers/mlflow.gin", f"--gin.CHECKPOINT_PATH={tracked / 'checkpoint_3'}",
      f"--gin.EVAL_OUTPUT_DIR={out}", "--gin.MIXTURE_OR_TASK_NAME='mt_count_words'",
      "--gin.EVAL_MAX_EXAMPLES=2", "--gin.BATCH_SIZE=2",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]) == 0
  [row] = rows(out / "metrics" / "eval.jsonl")
  assert row["step"] == 3 and row["task"] == "mt_count_words" and "accuracy" in row
  client = mlflow_client(out)
  run_id = json.loads((out / "trackers" / "mlflow.json").read_text())["run_id"]
  run = client.get_run(run_id)
  assert run.info.run_name == "eval" and run.info.status == "FINISHED"
  logged = {key: mlflow_history(client, run_id, key) for key in run.data.metrics}
  assert logged == {f"eval/mt_count_words/{k}": [(3, v)] for k, v in row.items()
                    if k not in ("step", "task")}
  assert run.data.params["CHECKPOINT_PATH"] == str(tracked / "checkpoint_3")
  config = pathlib.Path(client.download_artifacts(run_id, "config.gin")).read_text()
  assert "eval_run.evaluate.trackers = @tracker.selected()" in config


def test_flat_gin_params_equal_what_gin_reads(tracked):
  """The flat config's literals are the values gin itself binds from config.gin."""
  text = (tracked / "config.gin").read_text()
  flat = gin_params.flat(text)
  gin.clear_config()
  try:
    gin.parse_config(text)
    literal = {k: v for k, v in flat.items() if not isinstance(v, str) or v[:1] not in "@%["}
    assert len(literal) > 20
    for key, value in literal.items():
      assert gin.query_parameter(key if "." in key else f"%{key}") == value, key
  finally:
    gin.clear_config()
  assert flat["MODEL"] == "@encoder_decoder.EncoderDecoderModel()"
  assert flat["run_config.CheckpointConfig.period"] == "%CHECKPOINT_PERIOD"


def _log_steps(trackers, steps, offset):
  for step in steps:
    for t in trackers:
      t.log(step, {"train/loss": offset + step, "eval/task/accuracy": math.nan})


def test_resume_and_rewind(tmp_path, offline):
  """A NaN rollback to step 3 after step 5, then a restart: W&B keeps the first values of
  steps 4-5 and its run id; MLflow appends the re-run values to the same run and keeps the
  first params; a failed start is recorded as failed."""
  run = tracker.TrackedRun(model_dir=tmp_path, params={"A": 1, "S/x.y": [1, 2]},
                           files={"config.gin": "A = 1\n"})
  first = tracker.open_all([wandb_tracker.WandbTracker(), mlflow_tracker.MlflowTracker()], run)
  _log_steps(first, [1, 2, 3, 4, 5], 0.0)
  for t in first:
    t.rewind(3)
  _log_steps(first, [4, 5, 6], 10.0)
  for t in first:
    t.close()
  restarted = tracker.TrackedRun(model_dir=tmp_path, params={"A": 2, "B": "new"},
                                 files={"config.gin": "A = 2\n"})
  second = tracker.open_all([wandb_tracker.WandbTracker(), mlflow_tracker.MlflowTracker()],
                            restarted)
  _log_steps(second, [7], 10.0)
  for t in second:
    t.close(failed=True)

  before, after = [wandb_offline_log.read(d)
                   for d in sorted((tmp_path / "wandb").glob("offline-run-*"))]
  assert before.run_id == after.run_id
  assert {s: r["train/loss"] for s, r in before.history.items()} == {
      1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0, 6: 16.0}
  assert math.isnan(before.history[6]["eval/task/accuracy"])
  assert {s: r["train/loss"] for s, r in after.history.items()} == {7: 17.0}
  assert (before.exit_code, after.exit_code) == (0, 1)
  assert after.config["A"] == 2 and after.config["B"] == "new"

  client = mlflow_client(tmp_path)
  run_id = second[1].run_id
  assert run_id == first[1].run_id
  assert mlflow_history(client, run_id, "train/loss") == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (4, 14.0), (5, 15.0), (6, 16.0),
      (7, 17.0)]
  record = client.get_run(run_id)
  assert record.data.params == {"A": "1", "S:x.y": "[1, 2]", "B": "new"}
  assert record.info.status == "FAILED"
  assert pathlib.Path(client.download_artifacts(run_id, "config.gin")).read_text() == "A = 2\n"


def test_wandb_disabled_mode_logs_nothing(tmp_path, offline):
  run = tracker.TrackedRun(model_dir=tmp_path, params={"A": 1}, files={"config.gin": "A = 1\n"})
  [disabled] = tracker.open_all([wandb_tracker.WandbTracker(mode="disabled")], run)
  _log_steps([disabled], [1, 2], 0.0)
  disabled.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["trackers"]


def test_a_missing_library_or_bad_mode_is_a_config_error(monkeypatch):
  with pytest.raises(errors.ConfigError, match="WandbTracker.mode"):
    wandb_tracker.WandbTracker(mode="sometimes")
  monkeypatch.setitem(sys.modules, "wandb", None)
  monkeypatch.setitem(sys.modules, "mlflow", None)
  with pytest.raises(errors.ConfigError, match=r"wandb is not installed .*t5xlike\[wandb\]"):
    wandb_tracker.WandbTracker()
  with pytest.raises(errors.ConfigError, match=r"mlflow is not installed .*t5xlike\[mlflow\]"):
    mlflow_tracker.MlflowTracker()


def test_trackers_that_are_not_trackers_exit_2(tmp_path, capsys):
  assert train.main([*SMALL, f"--gin.MODEL_DIR={tmp_path / 'run'}", "--gin.TRAIN_STEPS=1",
                     "--gin.train_run.train.trackers='wandb'"]) == 2
  assert "error: train_run.train.trackers must be a list" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()
  assert eval_command.main([
      "--gin_file=models/t5_1_1/tiny.gin", "--gin_file=runs/eval.gin",
      f"--gin.CHECKPOINT_PATH={tmp_path}", f"--gin.EVAL_OUTPUT_DIR={tmp_path / 'eval'}",
      "--gin.eval_run.evaluate.trackers=[1]"]) == 2
  assert "error: eval_run.evaluate.trackers: 1 is not a tracker" in capsys.readouterr().err
  assert not (tmp_path / "eval").exists()


def test_a_run_without_trackers_imports_neither_library(tmp_path):
  code = ("import sys\nfrom t5xlike import train\n"
          f"assert train.main({SMALL + ['--gin.TRAIN_STEPS=1', '--gin.EVAL_PERIOD=None']!r} + "
          f"['--gin.MODEL_DIR={tmp_path}']) == 0\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow')))\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.splitlines()[-1] == "[]"
  assert (tmp_path / "metrics" / "train.jsonl").exists()


class _Recording(tracker.Tracker):
  """A tracker that records what it is told; `fail_on` names a method that raises."""

  def __init__(self, name, fail_on=None):
    self.name, self.fail_on, self.calls = name, fail_on, []

  def _call(self, what, *args):
    self.calls.append((what, *args))
    if what == self.fail_on:
      raise OSError(f"{self.name}: {what} failed")

  def open(self, run):
    self._call("open")

  def log(self, step, values):
    self._call("log", step, dict(values))

  def rewind(self, step):
    self._call("rewind", step)

  def close(self, failed=False):
    self._call("close", failed)


def test_eval_rows_close_every_tracker_and_record_a_failure(tmp_path):
  from t5xlike import metrics
  good = _Recording("good")
  metrics.write_eval_rows(tmp_path / "ok", 5, {"t": {"accuracy": 50.0}}, "eval", [good])
  assert good.calls == [("log", 5, {"eval/t/accuracy": 50.0}), ("close", False)]
  assert rows(tmp_path / "ok" / "metrics" / "eval.jsonl") == [
      {"step": 5, "task": "t", "accuracy": 50.0}]
  # A tracker that fails to log: the other is closed as failed, the error goes on.
  broken, other = _Recording("broken", fail_on="log"), _Recording("other")
  with pytest.raises(OSError, match="broken: log failed"):
    metrics.write_eval_rows(tmp_path / "bad", 5, {"t": {"accuracy": 1.0}}, "eval",
                            [broken, other])
  assert broken.calls[-1] == ("close", True) and other.calls[-1] == ("close", True)
  # One that fails to close does not keep the next from closing.
  first, second = _Recording("first", fail_on="close"), _Recording("second")
  writer = metrics.MetricsWriter(tmp_path / "close", trackers=[first, second])
  with pytest.raises(OSError, match="first: close failed"):
    writer.close()
  assert second.calls == [("close", False)]

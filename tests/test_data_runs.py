"""Training through the data engine: user tasks cached or not, mixtures, TFDS, kill -9 resume."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import tensorflow_datasets as tfds

from t5xlike import cache_tasks, train

QA = ["--gin_file=gin_configs/quickstart.gin", "--gin.MIXTURE_OR_TASK_MODULE=tests.user_tasks",
      "--gin.train_run.train.objective=None", "--gin.BATCH_SIZE=4", "--gin.LOG_PERIOD=1",
      "--gin.EVAL_PERIOD=None", "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}"]


def losses(model_dir):
  path = pathlib.Path(model_dir) / "metrics" / "train.jsonl"
  return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.slow  # ~54 s; test_sources' cache_tasks test covers the cache
def test_user_task_trains_the_same_cached_or_not(tmp_path):
  cache = tmp_path / "cache"
  assert cache_tasks.main(["--tasks=user_function_qa", f"--output_dir={cache}",
                           "--module=tests.user_tasks", "--splits=train"]) == 0
  args = QA + ["--gin.MIXTURE_OR_TASK_NAME='user_function_qa'", "--gin.TRAIN_STEPS=3"]
  assert train.main(args + [f"--gin.MODEL_DIR={tmp_path / 'plain'}"]) == 0
  assert train.main(args + [f"--gin.MODEL_DIR={tmp_path / 'cached'}",
                            "--gin.USE_CACHED_TASKS=True", f"--gin.TASK_CACHE_DIR={cache}"]) == 0
  assert losses(tmp_path / "plain") == losses(tmp_path / "cached")
  rows = [json.loads(l) for l in (tmp_path / "cached" / "metrics" / "train.jsonl").read_text()
          .splitlines()]
  assert all(0 < r["packing_efficiency"] <= 1 and r["loader_examples_per_second"] > 0
             for r in rows)


def test_missing_cache_is_a_one_line_error(tmp_path, capsys):
  args = QA + ["--gin.MIXTURE_OR_TASK_NAME='user_function_qa'", "--gin.TRAIN_STEPS=1",
               f"--gin.MODEL_DIR={tmp_path / 'run'}", "--gin.USE_CACHED_TASKS=True",
               f"--gin.TASK_CACHE_DIR={tmp_path / 'nothing'}"]
  assert train.main(args) == 2
  assert "python -m t5xlike.cache_tasks --tasks=user_function_qa" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def data_position(model_dir, step):
  return json.loads((pathlib.Path(model_dir) / f"checkpoint_{step}" / "data" / "metadata")
                    .read_text())["batches"]


def test_user_mixture_and_packing_train(tmp_path):
  args = QA + ["--gin.MIXTURE_OR_TASK_NAME='user_mixture'", "--gin.TRAIN_STEPS=6",
               "--gin.DataConfig.pack=True", f"--gin.MODEL_DIR={tmp_path}"]
  assert train.main(args) == 0
  rows = [json.loads(l) for l in (tmp_path / "metrics" / "train.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert all(0.3 < r["packing_efficiency"] <= 1 for r in rows)
  assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]  # it learns
  assert data_position(tmp_path, 6) == 6


def test_tfds_task_trains_offline(tmp_path):
  with tfds.testing.mock_data(num_examples=8):
    assert train.main(["--gin_file=gin_configs/quickstart.gin",
                       "--gin.MIXTURE_OR_TASK_MODULE=tests.user_tasks",
                       "--gin.MIXTURE_OR_TASK_NAME='user_tfds_imdb'", "--gin.BATCH_SIZE=2",
                       "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 5}",
                       "--gin.TRAIN_STEPS=6", "--gin.EVAL_PERIOD=None", "--gin.LOG_PERIOD=1",
                       f"--gin.MODEL_DIR={tmp_path}"]) == 0
  got = losses(tmp_path)
  assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
  assert got[-1][1] < got[0][1], got  # it learns the mock reviews' tokens
  assert data_position(tmp_path, 6) == 6


KILL_ARGS = ["--gin_file=gin_configs/quickstart.gin", "--gin.BATCH_SIZE=4",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.LOG_PERIOD=1",
             "--gin.EVAL_PERIOD=None", "--gin.CHECKPOINT_PERIOD=3", "--gin.TRAIN_STEPS=12",
             "--gin.CheckpointConfig.async_save=False"]


@pytest.mark.slow
def test_kill_9_then_restart_gives_the_uninterrupted_losses(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-m", "t5xlike.train", *KILL_ARGS]
  subprocess.run(command + [f"--gin.MODEL_DIR={tmp_path / 'whole'}"], check=True, env=env,
                 capture_output=True)
  killed = tmp_path / "killed"
  process = subprocess.Popen(command + [f"--gin.MODEL_DIR={killed}"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = killed / "metrics" / "train.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:  # Kill during a step after the step-6 checkpoint.
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  restored = max(int(p.name.split("_")[1]) for p in killed.glob("checkpoint_*"))
  assert 3 <= restored < 12
  subprocess.run(command + [f"--gin.MODEL_DIR={killed}"], check=True, env=env,
                 capture_output=True)
  whole = dict(losses(tmp_path / "whole"))
  after = [(s, l) for s, l in losses(killed) if s > restored][-(12 - restored):]
  assert [s for s, _ in after] == list(range(restored + 1, 13))
  assert all(whole[s] == l for s, l in after)  # bitwise: JSON floats round-trip exactly

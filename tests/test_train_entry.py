"""`python -m t5xlike.train` end to end: training, resume, initial checkpoint, errors.

Runs the entry point in-process on the quickstart config shrunk to tiny
batches, so that each run costs one compilation.
"""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from t5xlike import train

SMALL = ["--gin_file=gin_configs/quickstart.gin", "--gin.BATCH_SIZE=8",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.LOG_PERIOD=1",
         "--gin.EVAL_STEPS=1", "--gin.DROPOUT_RATE=0.1"]


def run(model_dir, *overrides):
  return train.main(SMALL + [f"--gin.MODEL_DIR={model_dir}", *overrides])


def rows(model_dir, kind="train"):
  path = pathlib.Path(model_dir) / "metrics" / f"{kind}.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def checkpoints(model_dir):
  return sorted(int(p.name.split("_")[1]) for p in pathlib.Path(model_dir).glob("checkpoint_*"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("uninterrupted")
  assert run(model_dir, "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_PERIOD=3",
             "--gin.EVAL_PERIOD=4") == 0
  return model_dir


def test_run_leaves_what_design_promises(uninterrupted):
  train_rows = rows(uninterrupted)
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  for key in ("loss", "accuracy", "z_loss", "learning_rate", "grad_norm", "tokens_per_second",
              "step_time_s"):
    assert all(isinstance(r[key], float) for r in train_rows), key
  # Model FLOPs per step (T5.1.1 tiny, vocabulary 8,192, batch 8 x 64 / 16) / step time / peak.
  from t5xlike import flops
  from t5xlike.models import t5
  tiny = t5.T5Config(vocab_size=8192, emb_dim=64, num_heads=4, num_encoder_layers=2,
                     num_decoder_layers=2, head_dim=16, mlp_dim=256)
  step_flops = flops.t5_step_flops(tiny, 8, 64, 16).model
  for r in train_rows:
    assert r["tflops_per_device"] * 1e12 * r["step_time_s"] == pytest.approx(step_flops)
    assert 0.0 < r["mfu"] < 1.0
  eval_rows = rows(uninterrupted, "eval")
  assert [(r["step"], r["task"]) for r in eval_rows] == [(4, "embedded_corpus"),
                                                          (6, "embedded_corpus")]
  assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 for r in eval_rows)
  assert checkpoints(uninterrupted) == [3, 6]
  assert "TRAIN_STEPS = 6" in (uninterrupted / "config.gin").read_text()
  assert list((uninterrupted / "tensorboard" / "train").glob("events.out.tfevents.*"))


def test_resume_continues_exactly(uninterrupted, tmp_path):
  assert run(tmp_path, "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_PERIOD=3",
             "--gin.EVAL_PERIOD=4") == 0
  assert checkpoints(tmp_path) == [3]
  assert run(tmp_path, "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_PERIOD=3",
             "--gin.EVAL_PERIOD=4") == 0
  resumed = rows(tmp_path)
  assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # no step repeated
  expected = {r["step"]: r["loss"] for r in rows(uninterrupted)}
  # Same data position, optimizer state and dropout RNG: bitwise-equal losses.
  assert [r["loss"] for r in resumed] == [expected[s] for s in range(1, 7)]
  assert checkpoints(tmp_path) == [3, 6]
  # Running the finished command again trains nothing and writes no row.
  assert run(tmp_path, "--gin.TRAIN_STEPS=6") == 0
  assert len(rows(tmp_path)) == 6


def test_initial_checkpoint_continues_step_count(uninterrupted, tmp_path):
  start = uninterrupted / "checkpoint_3"
  assert run(tmp_path, "--gin.TRAIN_STEPS=5", f"--gin.INITIAL_CHECKPOINT_PATH={start}",
             "--gin.EVAL_PERIOD=None") == 0
  assert [r["step"] for r in rows(tmp_path)] == [4, 5]
  assert checkpoints(tmp_path) == [5]
  # Same parameters and optimizer state as the source run at step 3, but the data
  # starts from the beginning: step 4 sees batch 1, so the loss differs from the
  # source run's step 4 yet stays in its range.
  source = {r["step"]: r["loss"] for r in rows(uninterrupted)}
  assert rows(tmp_path)[0]["loss"] != source[4]
  assert rows(tmp_path)[0]["loss"] < source[1]


@pytest.mark.slow  # ~26 s; the quickstart doc test trains further
def test_loss_falls_over_30_steps(tmp_path):
  assert run(tmp_path, "--gin.TRAIN_STEPS=30", "--gin.BATCH_SIZE=16", "--gin.LOG_PERIOD=10",
             "--gin.EVAL_PERIOD=None", "--gin.CHECKPOINT_PERIOD=100") == 0
  losses = [r["loss"] for r in rows(tmp_path)]
  assert [r["step"] for r in rows(tmp_path)] == [1, 10, 20, 30]
  assert losses[-1] < 0.75 * losses[0]


@pytest.mark.parametrize("override, culprit", [
    ("--gin.t5.T5Config.emb_dimm=3", "emb_dimm"),
    ("--gin.TRAIN_STEP=5", "TRAIN_STEP"),
    ("--gin_file=no/such/file.gin", "no/such/file.gin"),
    ("--gin.MIXTURE_OR_TASK_NAME='no_such_task'", "no_such_task"),
    ("--gin.MESH_SHAPE={'data': 3}", "MESH_SHAPE"),
    ("--gin.MESH_SHAPE={'model': 1}", "model"),
    ("--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 5}", "targets"),
    ("--gin.INITIAL_CHECKPOINT_PATH='/no/such/checkpoint_3'", "INITIAL_CHECKPOINT_PATH"),
    ("--gin.TRAIN_STEPS=0", "TRAIN_STEPS"),
    ("--gin.MIXTURE_OR_TASK_MODULE='no_such_module'", "no_such_module"),
    # The old name, from the source checkout's root: the new one, without a second
    # registration of every task.
    ("--gin.MIXTURE_OR_TASK_MODULE='tasks.embedded'", "use 't5xlike.tasks.embedded'"),
    ("--gin.DROPOUT_RATE=2.0", "dropout_rate"),  # raised while gin builds the model
    ("--gin.BATCH_SIZE='8'", "BATCH_SIZE"),
])
def test_bad_configuration_fails_in_one_line_and_writes_nothing(tmp_path, capsys, override,
                                                                culprit):
  model_dir = tmp_path / "existing"
  model_dir.mkdir()
  (model_dir / "keep.txt").write_text("untouched")
  assert run(model_dir, override) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: ") and culprit in err[-1], err[-1]
  assert sorted(p.name for p in model_dir.iterdir()) == ["keep.txt"]
  assert not (tmp_path / "fresh").exists()
  assert run(tmp_path / "fresh", override) == 2
  assert not (tmp_path / "fresh").exists()


@pytest.mark.slow  # ~18 s; also a fault-drill case
def test_half_written_checkpoint_is_never_picked(uninterrupted, tmp_path):
  # What a crash in the middle of orbax's save of step 9 leaves behind: the
  # step's temporary directory, never renamed to checkpoint_9.
  model_dir = tmp_path / "run"
  shutil.copytree(uninterrupted, model_dir)
  shutil.copytree(model_dir / "checkpoint_6",
                  model_dir / "checkpoint_9.orbax-checkpoint-tmp-1795000000000000")
  assert run(model_dir, "--gin.TRAIN_STEPS=7", "--gin.EVAL_PERIOD=None") == 0
  assert [r["step"] for r in rows(model_dir)][-1:] == [7]
  assert [r["step"] for r in rows(model_dir)] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.slow
def test_quickstart_as_the_readme_runs_it(tmp_path):
  """The README's first command (after installation): loss falls to <= 0.7x."""
  result = subprocess.run(
      [sys.executable, "-m", "t5xlike.train", "--gin_file=gin_configs/quickstart.gin",
       f"--gin.MODEL_DIR={tmp_path}"], capture_output=True, text=True, timeout=900,
      cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode == 0, result.stderr[-3000:]
  train_rows = rows(tmp_path)
  assert train_rows[0]["step"] == 1 and train_rows[-1]["step"] == 400
  assert train_rows[-1]["loss"] <= 0.7 * train_rows[0]["loss"]
  assert "ETA" in result.stdout and "tok/s" in result.stdout
  assert checkpoints(tmp_path)[-1] == 400

"""A T5X user's first day: their own task module through runs/finetune.gin, runs/eval.gin and
runs/infer.gin with only MIXTURE_OR_TASK_MODULE and MIXTURE_OR_TASK_NAME changed, and the
configuration errors reported early, in one line, naming the macro."""
import json
import logging
import pathlib

import pytest

from t5xlike import eval as eval_command, infer, train

MODULE = "--gin.MIXTURE_OR_TASK_MODULE=tests.first_day_tasks"
SMALL = ["--gin.BATCH_SIZE=4", "--gin.LOG_PERIOD=1"]
FINETUNE = ["--gin_file=gin_configs/models/t5_1_1/tiny.gin",
            "--gin_file=gin_configs/runs/finetune.gin", MODULE, *SMALL]


def rows(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> pathlib.Path:
  """A 2-step quickstart checkpoint (the user's starting point)."""
  model_dir = tmp_path_factory.mktemp("pretrained")
  assert train.main(["--gin_file=gin_configs/quickstart.gin", f"--gin.MODEL_DIR={model_dir}",
                     "--gin.TRAIN_STEPS=2", "--gin.EVAL_PERIOD=None", *SMALL,
                     "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]) == 0
  return model_dir / "checkpoint_2"


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory) -> pathlib.Path:
  """The user's mixture fine-tuned for 2 steps, evaluated at the end."""
  model_dir = tmp_path_factory.mktemp("finetuned")
  assert train.main([*FINETUNE, "--gin.MIXTURE_OR_TASK_NAME=first_day_mix",
                     f"--gin.INITIAL_CHECKPOINT_PATH={pretrained}",
                     f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=4"]) == 0
  return model_dir


def test_evaluation_follows_the_trained_mixture_and_skips_tasks_without_metrics(finetuned):
  evals = rows(finetuned / "metrics" / "eval.jsonl")
  # What is evaluated is what is trained: the user's tasks, not the built-in mixture.
  assert {row["task"] for row in evals} == {"first_day_mix", "first_day_qa"}
  scored = [row for row in evals if row["task"] == "first_day_qa"]
  assert len(scored) == 1 and scored[0]["step"] == 4 and 0.0 <= scored[0]["exact"] <= 100.0
  assert scored[0]["examples"] == 6  # the validation split's 6 rows
  outputs = rows(finetuned / "inference_eval" / "first_day_qa-4.jsonl")
  assert len(outputs) == 6


def test_eval_and_infer_of_the_users_task(finetuned, tmp_path):
  checkpoint = finetuned / "checkpoint_4"
  names = [MODULE, "--gin.MIXTURE_OR_TASK_NAME=first_day_qa",
           f"--gin.CHECKPOINT_PATH={checkpoint}", *SMALL[:1]]
  assert eval_command.main(["--gin_file=gin_configs/models/t5_1_1/tiny.gin",
                            "--gin_file=gin_configs/runs/eval.gin", *names,
                            f"--gin.EVAL_OUTPUT_DIR={tmp_path / 'eval'}"]) == 0
  [row] = rows(tmp_path / "eval" / "metrics" / "eval.jsonl")
  assert row["task"] == "first_day_qa" and row["step"] == 4 and "exact" in row
  assert infer.main(["--gin_file=gin_configs/models/t5_1_1/tiny.gin",
                     "--gin_file=gin_configs/runs/infer.gin", *names,
                     f"--gin.INFER_OUTPUT_DIR={tmp_path / 'infer'}"]) == 0
  predicted = rows(tmp_path / "infer" / "first_day_qa-4.jsonl")
  assert len(predicted) == 6 and all("prediction" in r for r in predicted)


@pytest.mark.slow  # ~22 s
def test_a_run_without_evaluation_reads_no_evaluation_split(pretrained, tmp_path):
  # The task's validation split raises when read: nothing of evaluation may touch it.
  assert train.main([*FINETUNE, "--gin.MIXTURE_OR_TASK_NAME=first_day_broken_validation",
                     f"--gin.INITIAL_CHECKPOINT_PATH={pretrained}", "--gin.EVAL_PERIOD=None",
                     f"--gin.MODEL_DIR={tmp_path}", "--gin.TRAIN_STEPS=3"]) == 0
  assert [r["step"] for r in rows(tmp_path / "metrics" / "train.jsonl")] == [3]


@pytest.mark.slow  # ~26 s; the mixture test skips such a task
def test_a_task_without_metric_functions_is_evaluated_by_loss_only(pretrained, tmp_path):
  assert train.main([*FINETUNE, "--gin.MIXTURE_OR_TASK_NAME=first_day_unscored",
                     f"--gin.INITIAL_CHECKPOINT_PATH={pretrained}",
                     f"--gin.MODEL_DIR={tmp_path}", "--gin.TRAIN_STEPS=3"]) == 0
  [row] = rows(tmp_path / "metrics" / "eval.jsonl")
  assert row["task"] == "first_day_unscored" and row["step"] == 3 and "accuracy" in row


def _error(capsys) -> str:
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def test_nothing_to_train_from_a_checkpoint_is_a_configuration_error(pretrained, tmp_path,
                                                                      capsys):
  model_dir = tmp_path / "new_run"
  assert train.main([*FINETUNE, "--gin.MIXTURE_OR_TASK_NAME=first_day_qa",
                     f"--gin.INITIAL_CHECKPOINT_PATH={pretrained}",
                     f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=2"]) == 2
  line = _error(capsys)
  assert "TRAIN_STEPS=2 is the total step count" in line and "--gin.TRAIN_STEPS=4" in line
  assert not model_dir.exists()


@pytest.mark.parametrize("override, culprit", [
    ("--gin.INITIAL_CHECKPOINT_PATH=/nonexistent/checkpoint_9", "/nonexistent/checkpoint_9 "
     "does not exist"),
    ("--gin.TASK_FEATURE_LENGTHS=64", "TASK_FEATURE_LENGTHS=64: expected a dict"),
    ("--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 2}", "task 'first_day_qa': "
     "TASK_FEATURE_LENGTHS['targets']=2 is too short: span corruption"),
    ("--gin.MIXTURE_OR_TASK_NAME=first_day_qq", "MIXTURE_OR_TASK_NAME: unknown task or mixture "
     "'first_day_qq'; did you mean 'first_day_qa'"),
    ("--gin.TRAIN_STEPS=1e3", "TRAIN_STEPS=1000.0: expected an integer"),
])
def test_configuration_errors_come_before_the_data_is_read(override, culprit, tmp_path,
                                                          capsys, caplog):
  model_dir = tmp_path / "run"
  # The quickstart's span corruption on the user's task (its `targets` feature).
  args = ["--gin_file=gin_configs/quickstart.gin", f"--gin.MODEL_DIR={model_dir}", MODULE,
          "--gin.MIXTURE_OR_TASK_NAME=first_day_qa", override]
  with caplog.at_level(logging.INFO):
    assert train.main(args) == 2
  assert culprit in _error(capsys)
  assert not model_dir.exists()
  # Reported before the pipeline read an example ("read ... into memory" is its first line).
  assert "into memory" not in caplog.text


def test_truncated_supervised_examples_are_counted_once(caplog):
  from t5xlike.data import feed_steps, pipeline
  from tests import first_day_tasks  # noqa: F401  (registers the tasks)
  counter = feed_steps.TruncationCount("t")
  lengths = {"inputs": 4, "targets": 3}
  for example in ({"inputs": [1, 2, 3], "targets": [1, 2]},      # fits with EOS appended
                  {"inputs": [1, 2, 3, 4], "targets": [1, 2]},   # inputs: 4 + EOS > 4
                  {"inputs": [1], "targets": [1, 2, 3, 4]}):     # targets cut
    counter.add(feed_steps.truncated_features(example, ("inputs", "targets"), lengths))
  assert (counter.examined, counter.truncated, counter.per_feature) == (
      3, 2, {"inputs": 1, "targets": 1})
  # Every example of first_day_qa ('repeat: a b' -> 'a b') is longer than 3 input tokens.
  with caplog.at_level(logging.WARNING):
    with pipeline.make_feed("first_day_qa", "train", {"inputs": 3, "targets": 16}, 2, None,
                            seed=0) as feed:
      for _ in range(feed_steps.TRUNCATION_REPORT_AFTER_BATCHES + 1):
        next(feed)
  lines = [r.getMessage() for r in caplog.records if "TASK_FEATURE_LENGTHS" in r.getMessage()]
  assert len(lines) == 1 and "(100.0%) are longer" in lines[0] and "inputs" in lines[0]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    with pipeline.make_feed("first_day_qa", "train", {"inputs": 64, "targets": 16}, 2, None,
                            seed=0) as feed:
      for _ in range(feed_steps.TRUNCATION_REPORT_AFTER_BATCHES + 1):
        next(feed)
  assert "TASK_FEATURE_LENGTHS" not in caplog.text


def test_a_validation_split_smaller_than_a_batch_is_reported_before_training(pretrained,
                                                                            tmp_path, capsys):
  # first_day_qa's validation split holds 6 examples: no batch of 8 for evaluation.
  assert train.main([*FINETUNE, "--gin.MIXTURE_OR_TASK_NAME=first_day_qa",
                     f"--gin.INITIAL_CHECKPOINT_PATH={pretrained}", "--gin.BATCH_SIZE=8",
                     f"--gin.MODEL_DIR={tmp_path / 'run'}", "--gin.TRAIN_STEPS=3"]) == 2
  line = _error(capsys)
  assert "evaluation data" in line and "BATCH_SIZE=8" in line and "EVAL_PERIOD=None" in line
  assert not (tmp_path / "run").exists()

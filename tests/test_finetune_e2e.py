"""`slow`: the README's path end to end: quickstart pretraining -> multitask fine-tuning
-> the tasks' metrics rise above the pretrained checkpoint's (numbers in docs/finetuning.md)."""
import json
import pathlib

import pytest

from t5xlike import eval as eval_entry, train

MODEL = "--gin_file=gin_configs/models/t5_1_1/tiny.gin"
METRIC = {"mt_count_words": "accuracy", "mt_first_word": "accuracy", "mt_fill_blank": "accuracy",
          "mt_last_word": "accuracy", "mt_reverse_words": "sequence_accuracy",
          "mt_continue": "rouge1"}


def evaluate(checkpoint, out):
  assert eval_entry.main([MODEL, "--gin_file=gin_configs/runs/eval.gin",
                          f"--gin.CHECKPOINT_PATH={checkpoint}", f"--gin.EVAL_OUTPUT_DIR={out}",
                          "--gin.EVAL_MAX_EXAMPLES=128"]) == 0
  rows = [json.loads(l) for l in (pathlib.Path(out) / "metrics" / "eval.jsonl").read_text()
          .splitlines()]
  return {r["task"]: r for r in rows}


@pytest.mark.slow
def test_finetuning_the_quickstart_raises_the_task_metrics(tmp_path):
  pretrain, finetune = tmp_path / "pretrain", tmp_path / "finetune"
  assert train.main(["--gin_file=gin_configs/quickstart.gin", f"--gin.MODEL_DIR={pretrain}"]) == 0
  base = evaluate(pretrain / "checkpoint_400", tmp_path / "eval_base")
  assert train.main([MODEL, "--gin_file=gin_configs/runs/finetune.gin",
                     f"--gin.INITIAL_CHECKPOINT_PATH={pretrain}/checkpoint_400",
                     f"--gin.MODEL_DIR={finetune}", "--gin.TRAIN_STEPS=900",
                     "--gin.EVAL_PERIOD=None"]) == 0
  tuned = evaluate(finetune / "checkpoint_900", tmp_path / "eval_tuned")
  for task, name in METRIC.items():
    print(f"{task}: {name} {base[task][name]:.2f} -> {tuned[task][name]:.2f}; "
          f"loss {base[task]['loss']:.3f} -> {tuned[task]['loss']:.3f}")
  # Every task's target likelihood improves, held-out task included.
  assert all(tuned[t]["loss"] < base[t]["loss"] for t in METRIC)
  mean = lambda rows: sum(rows[t][n] for t, n in METRIC.items()) / len(METRIC)
  assert mean(tuned) > mean(base) + 5.0
  assert tuned["mt_count_words"]["accuracy"] > base["mt_count_words"]["accuracy"]

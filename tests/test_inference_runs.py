"""pretrain -> fine-tune -> eval -> infer from the command line with the shipped gin
files (tiny settings); the JSONL formats; metric plumbing with known predictions;
bad input to infer."""
import json
import logging
import pathlib

import pytest

from t5xlike import errors, eval as eval_entry, infer, train
from t5xlike.data import task_examples
from t5xlike.inference import jsonl_io, task_evaluator
from t5xlike.tasks import embedded

MODEL = "--gin_file=gin_configs/models/t5_1_1/tiny.gin"
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 24}"


def rows(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 2-step pretraining run and a 2-step fine-tuning run from its checkpoint."""
  base = tmp_path_factory.mktemp("runs")
  pretrain, finetune = base / "pretrain", base / "finetune"
  assert train.main(["--gin_file=gin_configs/quickstart.gin", f"--gin.MODEL_DIR={pretrain}",
                     "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4", "--gin.EVAL_PERIOD=None",
                     "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"]) == 0
  assert train.main([MODEL, "--gin_file=gin_configs/runs/finetune.gin",
                     f"--gin.INITIAL_CHECKPOINT_PATH={pretrain}/checkpoint_2",
                     f"--gin.MODEL_DIR={finetune}", "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=4",
                     "--gin.EVAL_PERIOD=2", "--gin.EVAL_STEPS=1", "--gin.EVAL_MAX_EXAMPLES=4",
                     "--gin.LOG_PERIOD=1", LENGTHS]) == 0
  return pretrain, finetune


def test_finetune_continues_the_step_count_and_evaluates_every_task(runs):
  _, finetune = runs
  assert [r["step"] for r in rows(finetune / "metrics" / "train.jsonl")] == [3, 4]
  assert (finetune / "checkpoint_4").is_dir()
  evals = rows(finetune / "metrics" / "eval.jsonl")
  tasks = {r["task"] for r in evals}
  assert "multitask_offline" in tasks  # the teacher-forced loss/accuracy of the mixture
  assert {"mt_first_word", "mt_reverse_words", "mt_continue"} <= tasks  # metric functions
  assert "mt_last_word" not in tasks  # held out of multitask_offline: evaluation follows training
  by_task = {r["task"]: r for r in evals if r["step"] == 4}
  assert {"loss", "accuracy"} <= set(by_task["multitask_offline"])
  assert "sequence_accuracy" in by_task["mt_reverse_words"]
  assert {"bleu", "rouge1"} <= set(by_task["mt_continue"])
  outputs = rows(finetune / "inference_eval" / "mt_first_word-4.jsonl")
  assert len(outputs) == 4 and set(outputs[0]) == {"inputs", "targets", "prediction", "score"}


def test_eval_writes_one_row_per_task_and_inference_outputs(runs, tmp_path):
  _, finetune = runs
  assert eval_entry.main([MODEL, "--gin_file=gin_configs/runs/eval.gin",
                          f"--gin.CHECKPOINT_PATH={finetune}/checkpoint_4",
                          f"--gin.EVAL_OUTPUT_DIR={tmp_path}", "--gin.EVAL_MAX_EXAMPLES=3",
                          "--gin.BATCH_SIZE=2", LENGTHS]) == 0
  evals = rows(tmp_path / "metrics" / "eval.jsonl")
  assert sorted(r["task"] for r in evals) == sorted(
      t.name for t in task_examples.leaf_tasks("multitask_offline_all"))
  assert all(r["step"] == 4 and r["examples"] == 3 for r in evals)
  outputs = rows(tmp_path / "inference_eval" / "mt_count_words-4.jsonl")
  assert len(outputs) == 3
  # infer's keys (jsonl_io): the decoded inputs and targets, then the results.
  assert set(outputs[0]) == {"inputs", "targets", "prediction", "score"}
  assert outputs[0]["inputs"].startswith(("How many", "Count", ))  or "number of words" in (
      outputs[0]["inputs"])
  assert outputs[0]["targets"].isdigit()


def test_task_metrics_follow_the_seqio_contract():
  """Known predictions -> known metric values (postprocess on targets and predictions)."""
  task_examples.import_module("t5xlike.tasks.multitask")
  task = task_examples.leaf_tasks("mt_count_words")[0]
  examples = task_examples.read_split(task, "validation", {"inputs": 64, "targets": 32},
                                      use_cached=False, cache_dir=None, max_examples=8)
  text = [task_examples.text_row(task, ex) for ex in examples]
  predictions = [row["targets"] if i % 4 else "no" for i, row in enumerate(text)]
  values = task_evaluator.task_metrics(task, examples, text, predictions, None)
  assert values == {"accuracy": pytest.approx(75.0)}
  reverse = task_examples.leaf_tasks("mt_reverse_words")[0]
  examples = task_examples.read_split(reverse, "validation", {"inputs": 64, "targets": 32},
                                      use_cached=False, cache_dir=None, max_examples=5)
  text = [task_examples.text_row(reverse, ex) for ex in examples]
  predictions = [f"  {row['targets']} " for row in text[:2]] + ["x"] * 3  # strip()ed
  assert task_evaluator.task_metrics(reverse, examples, text, predictions, None) == {
      "sequence_accuracy": pytest.approx(40.0)}


def _infer(checkpoint, mode, source, out, *extra):
  return infer.main([MODEL, "--gin_file=gin_configs/runs/infer.gin",
                     f"--gin.CHECKPOINT_PATH={checkpoint}", f"--mode={mode}",
                     f"--input={source}", f"--output={out}", "--gin.BATCH_SIZE=2", LENGTHS,
                     *extra])


def test_infer_predict_and_score_jsonl(runs, tmp_path):
  _, finetune = runs
  vocab = embedded.vocabulary()
  source = tmp_path / "in.jsonl"
  lines = [{"inputs": "Give the first word: the exact cause of", "id": 7},
           {"input_ids": [13, 14, 15], "targets": "ignored by predict"},
           {"inputs": "Count the words: one two three"}]
  source.write_text("".join(json.dumps(line) + "\n" for line in lines))
  out = tmp_path / "out.jsonl"
  assert _infer(finetune / "checkpoint_4", "predict", source, out,
                "--max_decode_length=5") == 0
  predicted = rows(out)
  assert [{k: r[k] for k in lines[i]} for i, r in enumerate(predicted)] == lines
  for row in predicted:
    ids = row["prediction_ids"]
    assert 1 <= len(ids) <= 5 and (ids[-1] == vocab.eos_id or len(ids) == 5)
    assert vocab.eos_id not in ids[:-1]
    assert row["prediction"] == vocab.decode(ids)
  # Scoring: summed token log-likelihoods, one per target token (+ EOS for text).
  scored_in = tmp_path / "score.jsonl"
  scored_in.write_text(json.dumps({"inputs": "Count the words: one two", "targets": "2"}) + "\n"
                       + json.dumps({"input_ids": [20, 21, 1], "target_ids": [5, 6, 7]}) + "\n")
  assert _infer(finetune / "checkpoint_4", "score", scored_in, out) == 0
  scored = rows(out)
  assert len(scored[0]["token_scores"]) == len(vocab.encode("2")) + 1
  assert len(scored[1]["token_scores"]) == 3
  for row in scored:
    assert row["score"] == pytest.approx(sum(row["token_scores"]), rel=1e-6)
    assert all(s <= 0 for s in row["token_scores"])


@pytest.mark.parametrize("content,message", [
    (b"\xff\xfe not utf-8\n", "not UTF-8"),
    (b"", "holds no example"),
    (b'{"targets": "no inputs"}\n', "needs 'inputs'"),
    (b'{"input_ids": [1, 99999]}\n', "99999"),
    (b"[1, 2]\n", "expected a JSON object"),
])
def test_infer_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, content,
                                                       message):
  _, finetune = runs
  source = tmp_path / "bad.jsonl"
  source.write_bytes(content)
  out = tmp_path / "out" / "never.jsonl"
  assert _infer(finetune / "checkpoint_4", "predict", source, out) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err
  assert not out.parent.exists()


def test_blank_input_lines_are_skipped_and_counted_in_the_log(tmp_path, caplog):
  source = tmp_path / "in.jsonl"
  source.write_text('\n{"input_ids": [5], "target_ids": [6]}\n  \t\n\n'
                    '{"input_ids": [7], "target_ids": [8, 9]}\n\n')
  with caplog.at_level(logging.INFO, logger="t5xlike.inference.jsonl_io"):
    read, examples = jsonl_io.read_examples(str(source), "score", None, 32)
  assert read == [{"input_ids": [5], "target_ids": [6]}, {"input_ids": [7], "target_ids": [8, 9]}]
  assert [e["targets"].tolist() for e in examples] == [[6], [8, 9]]
  assert caplog.messages == [f"{source}: 2 examples, 4 blank lines skipped"]
  # Line numbers in errors count the blank lines.
  source.write_text('\n\n{"input_ids": [5]}\n\n{"input_ids": "x"}\n')
  with pytest.raises(errors.ConfigError, match=r"in.jsonl:5: input_ids must be a list"):
    jsonl_io.read_examples(str(source), "predict", None, 32)


def test_eval_and_infer_refuse_missing_checkpoint(tmp_path, capsys):
  assert eval_entry.main([MODEL, "--gin_file=gin_configs/runs/eval.gin",
                          f"--gin.EVAL_OUTPUT_DIR={tmp_path / 'x'}"]) == 2
  assert "CHECKPOINT_PATH is not set" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
  assert _infer(tmp_path / "nope" / "checkpoint_3", "predict", tmp_path / "a.jsonl",
                tmp_path / "b.jsonl") == 2
  assert "nope/checkpoint_3 does not exist" in capsys.readouterr().err
  assert not (tmp_path / "b.jsonl").exists()


@pytest.mark.slow  # ~17 s; JSONL input stays in the default run
def test_infer_from_a_task_split_and_a_tsv_file(runs, tmp_path, capsys):
  _, finetune = runs
  assert infer.main([MODEL, "--gin_file=gin_configs/runs/infer.gin",
                     f"--gin.CHECKPOINT_PATH={finetune}/checkpoint_4",
                     "--gin.MIXTURE_OR_TASK_NAME='mt_first_word'",
                     f"--gin.INFER_OUTPUT_DIR={tmp_path}", "--gin.infer_run.infer.max_examples=3",
                     "--gin.BATCH_SIZE=2", LENGTHS]) == 0
  written = rows(tmp_path / "mt_first_word-4.jsonl")
  assert len(written) == 3 and all({"inputs", "targets", "prediction_ids"} <= set(r)
                                   for r in written)
  source = tmp_path / "in.tsv"
  source.write_text("Give the first word: a b c\ta\nGive the first word: d e\n")
  out = tmp_path / "out.jsonl"
  assert _infer(finetune / "checkpoint_4", "predict", source, out) == 0
  assert [r["inputs"] for r in rows(out)] == ["Give the first word: a b c",
                                              "Give the first word: d e"]
  # A missing input file is named, once the checkpoint exists.
  assert _infer(finetune / "checkpoint_4", "predict", tmp_path / "a.jsonl",
                tmp_path / "b.jsonl") == 2
  assert "a.jsonl: no such file" in capsys.readouterr().err
  assert not (tmp_path / "b.jsonl").exists()


@pytest.mark.slow  # ~26 s; decoder-only decoding is tested in process
def test_decoder_only_model_predicts_and_scores_from_the_command_line(tmp_path):
  """A prefix-LM decoder-only checkpoint through runs/infer.gin (KV cache, ragged prompts)."""
  model_dir = tmp_path / "prefix_lm"
  assert train.main(["--gin_file=gin_configs/objectives/prefix_lm.gin",
                     f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=2",
                     "--gin.EVAL_PERIOD=None",
                     "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}"]) == 0
  source = tmp_path / "in.jsonl"
  source.write_text('{"inputs": "the exact cause"}\n{"input_ids": [20, 21, 22, 23, 24, 25]}\n'
                    '{"inputs": "a", "targets": "b c"}\n')
  out = tmp_path / "out.jsonl"
  args = ["--gin_file=gin_configs/models/decoder/tiny.gin", "--gin_file=gin_configs/runs/infer.gin",
          f"--gin.CHECKPOINT_PATH={model_dir}/checkpoint_1", "--gin.BATCH_SIZE=2",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}", f"--input={source}",
          f"--output={out}"]
  assert infer.main(args + ["--mode=predict", "--max_decode_length=4"]) == 0
  predicted = rows(out)
  vocabulary = embedded.vocabulary()
  assert [r.get("inputs", r.get("input_ids")) for r in predicted] == [
      "the exact cause", [20, 21, 22, 23, 24, 25], "a"]  # the input rows, in order
  assert all(1 <= len(r["prediction_ids"]) <= 4 for r in predicted)
  assert all(r["prediction"] == vocabulary.decode(r["prediction_ids"]) for r in predicted)
  # The same example as text and as ids (text gets EOS appended) scores the same.
  a, b_c = (list(vocabulary.encode(t)) + [1] for t in ("a", "b c"))
  source.write_text('{"inputs": "a", "targets": "b c"}\n{"input_ids": [9], "target_ids": [7]}\n'
                    + json.dumps({"input_ids": a, "target_ids": b_c}) + "\n")
  assert infer.main(args + ["--mode=score"]) == 0
  scored = rows(out)
  assert [len(r["token_scores"]) for r in scored] == [len(b_c), 1, len(b_c)]
  assert all(r["score"] < 0 and all(t < 0 for t in r["token_scores"]) for r in scored)
  assert all(r["score"] == pytest.approx(sum(r["token_scores"]), rel=1e-9) for r in scored)
  assert scored[0]["token_scores"] == pytest.approx(scored[2]["token_scores"], abs=1e-6)

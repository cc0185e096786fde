"""lm-evaluation-harness on a t5xlike checkpoint (`python -m t5xlike.lm_eval`), offline:
harness tasks in local YAML files over local JSONL (multiple choice, generation,
rolling log-likelihood), on random tiny checkpoints (encoder-decoder and prefix-LM
decoder-only). The harness's log-likelihoods are compared with `infer --mode=score` on
the same strings, its generations with `infer --mode=predict`, its accuracy with one
computed by hand from those scores."""
import json
import math
import pathlib

import gin
import jax
import numpy as np
import pytest
from flax import linen as nn

from t5xlike import checkpoints, infer, lm_eval as lm_eval_entry
from t5xlike.cli import gin_config
from t5xlike.inference import harness_requests
from t5xlike.inference.predictor import example_features
from t5xlike.interop import output_dir
from t5xlike.tasks import embedded

LENGTHS = {"inputs": 24, "targets": 8}
LENGTHS_FLAG = f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}"
# Each question once per label: whatever the model prefers, exactly one copy is right
# (accuracy 2/5 for any model without ties; the per-choice scores are what is compared).
_CHOICES = [("the exact cause of", ["the fire", "a dog", "blue sky"]),
            ("first word of: red green", ["red", "green"])]
MC = [{"question": q, "choices": c, "label": label} for q, c in _CHOICES
      for label in range(len(c))]
GEN = [{"question": "Give the first word: the exact cause", "answer": "the"},
       {"question": "Count the words: a b c", "answer": "3"}]
UNTIL = ["e", "a", "o"]
TEXTS = [{"text": "the exact cause of the fire was never found by anyone in the town"}]
MAX_GEN_TOKS = 5


def rows(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _write_tasks(root: pathlib.Path) -> pathlib.Path:
  """Three harness tasks (YAML) over local JSONL files; returns their directory."""
  tasks = root / "tasks"
  tasks.mkdir()
  for name, docs in (("mc", MC), ("gen", GEN), ("ppl", TEXTS)):
    (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  head = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
          "validation_split: validation\n")
  (tasks / "mc.yaml").write_text(
      "task: tiny_mc\n" + head.format(data=root / "mc.jsonl")
      + "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
      "doc_to_target: \"{{label}}\"\ndoc_to_choice: \"{{choices}}\"\n"
      "metric_list:\n  - metric: acc\n")
  (tasks / "gen.yaml").write_text(
      "task: tiny_gen\n" + head.format(data=root / "gen.jsonl")
      + "output_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
      "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n"
      f"  until: {json.dumps(UNTIL)}\n"
      f"  max_gen_toks: {MAX_GEN_TOKS}\nmetric_list:\n  - metric: exact_match\n")
  (tasks / "ppl.yaml").write_text(
      "task: tiny_ppl\n" + head.format(data=root / "ppl.jsonl")
      + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
      "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n")
  return tasks


def _random_checkpoint(root: pathlib.Path, gin_file: str, seed: int) -> pathlib.Path:
  """A step-3 checkpoint of the model of `gin_file`, random parameters."""
  gin_config.configure([gin_file])
  try:
    model = output_dir.configured_model()
  finally:
    gin.clear_config()
  params = model.init(jax.random.key(seed), example_features(model, LENGTHS))["params"]
  return checkpoints.save_params(root, 3, nn.meta.unbox(params))


@pytest.fixture(scope="module")
def harness_dir(tmp_path_factory, monkeypatch_module):
  root = tmp_path_factory.mktemp("lm_eval")
  monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch_module.setenv("HF_DATASETS_CACHE", str(root / "hf_cache"))
  return root, _write_tasks(root)


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as patch:
    yield patch


MODELS = {"encoder_decoder": "models/t5_1_1/tiny.gin", "decoder_only": "models/decoder/tiny.gin"}


@pytest.fixture(scope="module", params=list(MODELS))
def evaluated(request, harness_dir):
  """(kind, gin file, checkpoint, EVAL_OUTPUT_DIR) after one `python -m t5xlike.lm_eval`."""
  root, tasks = harness_dir
  kind = request.param
  checkpoint = _random_checkpoint(root / kind, MODELS[kind], seed=len(kind))
  out = root / kind / "eval"
  assert lm_eval_entry.main([
      f"--gin_file=gin_configs/{MODELS[kind]}", "--gin_file=gin_configs/runs/lm_eval.gin",
      f"--gin.CHECKPOINT_PATH={checkpoint}", f"--gin.EVAL_OUTPUT_DIR={out}", LENGTHS_FLAG,
      "--gin.BATCH_SIZE=4", "--tasks=tiny_mc,tiny_gen,tiny_ppl", f"--include_path={tasks}",
      "--bootstrap_iters=0", "--log_samples"]) == 0
  return kind, MODELS[kind], checkpoint, out


def _infer(gin_file, checkpoint, mode, lines, path, *extra):
  source = path.with_suffix(".in.jsonl")
  source.write_text("".join(json.dumps(line) + "\n" for line in lines))
  assert infer.main([f"--gin_file=gin_configs/{gin_file}", "--gin_file=gin_configs/runs/infer.gin",
                     f"--gin.CHECKPOINT_PATH={checkpoint}", f"--mode={mode}",
                     f"--input={source}", f"--output={path}", "--gin.BATCH_SIZE=4",
                     "--gin.PREPACK_PREFILL=False", LENGTHS_FLAG, *extra]) == 0
  return rows(path)


def _samples(out, task):
  return rows(out / "lm_eval" / f"samples-{task}-3.jsonl")


def test_harness_scores_equal_infer_scores_and_accuracy_is_argmax(evaluated, tmp_path):
  """Multiple choice: each choice's log-likelihood is infer's score of the same strings
  (the context as inputs, the choice as targets: infer appends EOS to text targets, so
  its last token score is left out); the harness's accuracy is the argmax accuracy of
  those scores."""
  _, gin_file, checkpoint, out = evaluated
  lines = [{"inputs": f"Question: {doc['question']}\nAnswer:", "targets": f" {choice}"}
           for doc in MC for choice in doc["choices"]]
  scored = _infer(gin_file, checkpoint, "score", lines, tmp_path / "scores.jsonl")
  by_hand = [math.fsum(row["token_scores"][:-1]) for row in scored]
  harness = [resp[0][0] for sample in _samples(out, "tiny_mc") for resp in sample["resps"]]
  assert [args for sample in _samples(out, "tiny_mc") for args in sample["arguments"]] == [
      [line["inputs"], line["targets"]] for line in lines]
  np.testing.assert_allclose(harness, by_hand, rtol=1e-5)
  correct, start = [], 0
  for doc in MC:
    choices = by_hand[start:start + len(doc["choices"])]
    start += len(doc["choices"])
    correct.append(int(np.argmax(choices)) == doc["label"])
  results = json.loads((out / "lm_eval" / "results-3.json").read_text())
  assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))
  row = next(r for r in rows(out / "metrics" / "eval.jsonl") if r["task"] == "tiny_mc")
  assert row == {"step": 3, "task": "tiny_mc", "acc": pytest.approx(np.mean(correct)),
                 "examples": len(MC)}


def test_harness_generation_is_infers_prediction_cut_at_until(evaluated, tmp_path):
  _, gin_file, checkpoint, out = evaluated
  predicted = _infer(gin_file, checkpoint, "predict", [{"inputs": d["question"]} for d in GEN],
                     tmp_path / "predicted.jsonl", f"--max_decode_length={MAX_GEN_TOKS}")
  vocabulary = embedded.vocabulary()
  full, cut = [], []
  for row in predicted:
    ids = row["prediction_ids"]
    assert len(ids) <= MAX_GEN_TOKS
    full.append(vocabulary.decode(ids[:ids.index(1)] if 1 in ids else ids))
    cut.append(harness_requests.cut_at(full[-1], UNTIL))
  assert cut != full  # the until strings did cut
  assert [s["filtered_resps"][0] for s in _samples(out, "tiny_gen")] == cut
  results = json.loads((out / "lm_eval" / "results-3.json").read_text())
  assert results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(
      np.mean([text.strip() == doc["answer"] for text, doc in zip(cut, GEN)]))


def test_rolling_loglikelihood_is_the_sum_of_window_scores(evaluated, tmp_path):
  """loglikelihood_rolling: windows of 'targets' ids, each scored after the ids before
  it (the first after the empty context: EOS alone as the encoder input / prefix)."""
  _, gin_file, checkpoint, out = evaluated
  tokens = [int(i) for i in embedded.vocabulary().encode(TEXTS[0]["text"])]
  width = LENGTHS["targets"]
  assert len(tokens) > 2 * width  # several windows
  lines = [{"input_ids": tokens[max(0, start - LENGTHS["inputs"] + 1):start] + [1],
            "target_ids": tokens[start:start + width]} for start in range(0, len(tokens), width)]
  lines[0] = {"inputs": "", "target_ids": tokens[:width]}  # infer's ids of "": EOS alone
  total = math.fsum(row["score"] for row in _infer(gin_file, checkpoint, "score", lines,
                                                   tmp_path / "rolling.jsonl"))
  assert _samples(out, "tiny_ppl")[0]["resps"][0][0] == pytest.approx(total, rel=1e-5)
  results = json.loads((out / "lm_eval" / "results-3.json").read_text())
  assert results["results"]["tiny_ppl"]["word_perplexity,none"] == pytest.approx(
      math.exp(-total / len(TEXTS[0]["text"].split())), rel=1e-5)


def test_unknown_harness_task_is_one_line_and_writes_nothing(harness_dir, tmp_path, capsys):
  _, tasks = harness_dir
  checkpoint = _random_checkpoint(tmp_path, MODELS["encoder_decoder"], seed=1)
  out = tmp_path / "eval"
  assert lm_eval_entry.main([
      f"--gin_file=gin_configs/{MODELS['encoder_decoder']}",
      "--gin_file=gin_configs/runs/lm_eval.gin", f"--gin.CHECKPOINT_PATH={checkpoint}",
      f"--gin.EVAL_OUTPUT_DIR={out}", "--tasks=tiny_mc,no_such_task",
      f"--include_path={tasks}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "'no_such_task' is not a harness task" in err
  assert "\n" not in err and not out.exists()


def test_registered_with_the_harness():
  from lm_eval.api import registry

  from t5xlike.inference.lm_eval_model import HarnessLM
  assert registry.get_model("t5xlike") is HarnessLM


def test_request_layouts_against_the_vocabulary():
  """Contexts cut from the left to fit, EOS after the context, causal rows hold context
  then continuation; a continuation longer than 'targets' is refused."""
  vocabulary = embedded.vocabulary()
  encode = lambda text: [int(i) for i in vocabulary.encode(text)]
  context, continuation = "the exact cause of the fire was never found", " by anyone"
  ctx, cont = encode(context), encode(continuation.strip())
  lengths = {"inputs": 5, "targets": 8}
  seq2seq = harness_requests.RequestEncoder(vocabulary, lengths, "encoder_decoder")
  assert seq2seq.encode_pair(context + " ", "by anyone") == (ctx, cont)  # the space moves
  row = seq2seq.scoring(ctx, cont)
  assert row.example["inputs"].tolist() == ctx[-4:] + [vocabulary.eos_id]
  assert row.example["targets"].tolist() == cont and row.scored == len(cont)
  assert seq2seq.prompt([]).tolist() == [vocabulary.eos_id]
  causal = harness_requests.RequestEncoder(vocabulary, lengths, "causal")
  whole = encode(context + continuation)
  assert causal.encode_pair(context, continuation) == (whole[:len(ctx)], whole[len(ctx):])
  row = causal.scoring(ctx, cont)
  assert "inputs" not in row.example and row.scored == len(cont)
  assert row.example["targets"].tolist() == (ctx + cont)[-8:]
  assert causal.truncated(ctx, cont) == (len(ctx) + len(cont) > 8)
  # A context shorter than the room is kept whole (and is not reported as cut).
  room = 8 - len(cont)
  assert room >= 4
  few = list(range(100, 100 + room - 1))  # shorter than the room, more than half of it
  short = causal.scoring(few, cont)
  assert short.example["targets"].tolist() == few + cont and short.scored == len(cont)
  assert not causal.truncated(few, cont)
  assert causal.scoring([], cont).example["targets"].tolist() == cont
  with pytest.raises(ValueError, match="longer than TASK_FEATURE_LENGTHS"):
    causal.scoring(ctx, list(range(5, 14)))
  with pytest.raises(ValueError, match="no prompt"):
    causal.prompt(ctx)
  assert harness_requests.cut_at("hello world. more", ["\n", ".", ""]) == "hello world"


def test_harness_rows_keep_numeric_metrics_per_filter():
  from t5xlike.runs import lm_eval_run
  results = {"results": {"t": {"alias": "t", "sample_len": 4, "acc,none": 0.5,
                               "acc_stderr,none": "N/A", "exact_match,strict-match": 1.0,
                               "exact_match_stderr,strict-match": 0.25}},
             "n-samples": {"t": {"original": 9, "effective": 4}}}
  assert lm_eval_run.harness_rows(results) == {"t": {
      "acc": 0.5, "exact_match/strict-match": 1.0, "exact_match_stderr/strict-match": 0.25,
      "examples": 4}}


def test_cut_contexts_are_counted_in_one_warning_per_task(caplog):
  from t5xlike.inference import lm_eval_model
  with caplog.at_level("WARNING", logger="t5xlike.inference.lm_eval_model"):
    lm_eval_model._warn_cut(["a", "a", "b", "a"], [True, False, False, True], "scored")
  assert [r.getMessage() for r in caplog.records] == [
      "harness task a: 2 of 3 contexts scored were cut from the left to fit "
      "TASK_FEATURE_LENGTHS (raise it to keep them whole)"]

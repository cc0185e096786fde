"""The offline multitask mixture (t5xlike.tasks.multitask), prompts, mixtures and text metrics."""
import collections
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
import seqio
import tensorflow as tf
from rouge_score import rouge_scorer

import t5xlike.tasks.multitask as mt
from t5xlike import text_metrics
from t5xlike.data import pipeline, sources
from t5xlike.tasks import embedded, mixtures, prompts
from t5xlike.tasks.prompts import Template

LENGTHS = {"inputs": 64, "targets": 32}
MAX_INPUTS, MAX_TARGETS = 48, 24  # Before EOS, as the module docstring states.


def encode(text: str) -> list[int]:
  return embedded.vocabulary().encode(text)


def expected_prompt(fields: dict, templates, seed: int = 0) -> tuple[dict, int]:
  """The rendered prompt and template id, computed here from the raw fields:
  Fingerprint64 of 'seed<US>field...' (sorted field names) modulo the count."""
  names = sorted({name for t in templates for name in (t.fields)})
  key = "\x1f".join([str(seed)] + [fields[name] for name in names])
  index = int(tf.strings.to_hash_bucket_fast(key, len(templates)).numpy())
  template = templates[index]
  return {"inputs": template.inputs.format(**fields),
          "targets": template.targets.format(**fields)}, index


@pytest.fixture(scope="module")
def feed():
  """The training mixture read by t5xlike's pipeline (its sources: the train splits)."""
  with pipeline.make_feed("multitask_offline", "train", LENGTHS, batch_size=8, objective=None,
                          seed=0, feature_converter="encoder_decoder", use_cached=False,
                          cache_dir=None, process_index=0, process_count=1,
                          num_threads=0) as f:
    yield f


@pytest.fixture(scope="module")
def validation():
  return {task.name: sources.load_in_memory(task.name, "validation") for task in mt.TASKS}


def test_registered_tasks_and_mixtures():
  names = [task.name for task in mt.TASKS]
  assert len(names) >= 5 and all(name.startswith("mt_") for name in names)
  for task in mt.TASKS:
    registered = seqio.get_mixture_or_task(task.name)
    assert registered.splits == ("train", "validation")
    assert len(task.templates) >= 2
    assert registered.metric_fns == list(task.metric_fns) and registered.metric_fns
    assert registered.postprocess_fn("  word \n", example={}, is_target=False) == "word"
  training = {t.name for t in seqio.get_mixture_or_task("multitask_offline").tasks}
  heldout = {t.name for t in seqio.get_mixture_or_task("multitask_offline_heldout").tasks}
  everything = {t.name for t in seqio.get_mixture_or_task("multitask_offline_all").tasks}
  assert heldout and not training & heldout
  assert training | heldout == everything == set(names)
  mt.register()  # Idempotent.
  with pytest.raises(ValueError, match="already registered"):
    mixtures.add_mixture("multitask_offline", sorted(training), maximum=1)


def test_examples_are_deterministic_and_sized():
  for task in mt.TASKS:
    for split, size in task.sizes:
      assert len(mt.examples(task.name, split)) == size
  for name, split in [(task.name, "validation") for task in mt.TASKS] + [("mt_continue", "train")]:
    rows = mt.examples(name, split)
    mt.examples.cache_clear()
    assert mt.examples(name, split) == rows  # Regenerated: the same examples.
  train = {row["phrase"] for row in mt.examples("mt_reverse_words", "train")}
  held = {row["phrase"] for row in mt.examples("mt_reverse_words", "validation")}
  assert len(held - train) > 0.9 * len(held)  # Validation comes from other documents.


def test_word_games_are_right():
  for row in mt.examples("mt_reverse_words", "validation"):
    assert row["reversed"].split() == row["phrase"].split()[::-1]
    assert 3 <= len(row["phrase"].split()) <= 6
  counts = collections.Counter(row["count"] for row in mt.examples("mt_count_words", "train"))
  assert set(counts) == {str(n) for n in range(3, 10)}
  for row in mt.examples("mt_count_words", "validation"):
    assert row["count"] == str(len(row["phrase"].split()))
  for row in mt.examples("mt_first_word", "validation"):
    assert row["word"] == row["phrase"].split()[0]
  for row in mt.examples("mt_last_word", "validation"):
    assert row["word"] == row["phrase"].split()[-1]
  for row in mt.examples("mt_fill_blank", "validation"):
    words = row["masked"].split()
    assert words.count("___") == 1 and 6 <= len(words) <= 12
  for row in mt.examples("mt_continue", "validation"):
    assert len(row["prefix"].split()) >= 5 and 3 <= len(row["continuation"].split()) <= 6


def test_token_layout_matches_the_prompts(validation):
  vocabulary = embedded.vocabulary()
  for task in mt.TASKS:
    source = validation[task.name]
    rows = mt.examples(task.name, "validation")
    assert len(source) == len(rows) and source.eos_features == ("inputs", "targets")
    ids = []
    for i in (0, 1, len(rows) - 1):
      prompt, index = expected_prompt(rows[i], task.templates)
      np.testing.assert_array_equal(source[i]["inputs"], encode(prompt["inputs"]))
      np.testing.assert_array_equal(source[i]["targets"], encode(prompt["targets"]))
      assert vocabulary.decode(source[i]["targets"].tolist()) == prompt["targets"]
      ids.append(index)
  first = mt.examples("mt_reverse_words", "validation")[0]  # Pinned: the layout of one example.
  assert first == {"phrase": "than size bytes", "reversed": "bytes size than"}
  assert vocabulary.decode(validation["mt_reverse_words"][0]["inputs"].tolist()) == (
      "Reverse the order of these words: than size bytes")
  assert prompts.template_index(first, mt.BY_NAME["mt_reverse_words"].templates) == 0


def test_every_template_used_about_uniformly(feed, validation):
  train = dict(zip([t.name for t in feed.tasks], feed.sources))
  splits = [(name, "train", source, 7) for name, source in train.items()]  # Every 7th example.
  splits += [(name, "validation", source, 1) for name, source in validation.items()]
  for name, split, source, step in splits:
    templates, rows = mt.BY_NAME[name].templates, mt.examples(name, split)
    picks = collections.Counter()
    for i in range(0, len(rows), step):  # Checked token for token.
      prompt, index = expected_prompt(rows[i], templates)
      np.testing.assert_array_equal(source[i]["inputs"], encode(prompt["inputs"]))
      picks[index] += 1
    shares = np.array([picks[k] for k in range(len(templates))]) / sum(picks.values())
    np.testing.assert_allclose(shares, 1 / len(templates), atol=0.05 if step > 1 else 0.1,
                               err_msg=f"{name}/{split}")
  again = sources.load_in_memory("mt_count_words", "validation")  # A second read: same choice.
  for i in range(len(again)):
    np.testing.assert_array_equal(again[i]["inputs"], validation["mt_count_words"][i]["inputs"])


def test_another_seed_chooses_other_templates():
  templates = [Template("a {x}", "{x}"), Template("b {x}", "{x}"), Template("c {x}", "{x}")]
  data = tf.data.Dataset.from_tensor_slices({"x": [f"w{i}" for i in range(60)]})
  picks = {seed: [int(e["template_id"]) for e in
                  prompts.apply_templates(templates, seed=seed)(data).as_numpy_iterator()]
           for seed in (0, 1)}
  assert picks[0] != picks[1]
  rendered = list(prompts.apply_templates(templates, seed=1)(data).as_numpy_iterator())
  for i, example in enumerate(rendered):
    prompt, index = expected_prompt({"x": f"w{i}"}, templates, seed=1)
    assert (example["inputs"].decode(), example["targets"].decode()) == (
        prompt["inputs"], prompt["targets"])
    assert example["template_id"] == index
  with pytest.raises(ValueError, match="plain"):
    Template("{x:>3}", "{x}")


def test_lengths_within_task_feature_lengths(feed, validation):
  for source in list(feed.sources) + list(validation.values()):
    assert source.token_lengths("inputs").max() <= MAX_INPUTS, source
    assert source.token_lengths("targets").max() <= MAX_TARGETS, source
    assert source.token_lengths("targets").min() >= 1, source


def test_mixture_rates_examples_proportional_with_cap(feed):
  counts = {task.name: dict(task.sizes)["train"] for task in mt.TASKS if task.name in mt.TRAINING}
  capped = {name: min(count, mt.MAXIMUM) for name, count in counts.items()}
  assert capped != counts  # The cap applies to some tasks.
  names = [t.name for t in feed.tasks]  # seqio orders a mixture's tasks by name.
  assert sorted(names) == sorted(mt.TRAINING)
  assert feed.examples_per_task == [counts[name] for name in names]
  total = sum(capped.values())
  np.testing.assert_allclose(np.array(feed.rates) / sum(feed.rates),
                             [capped[name] / total for name in names])
  mixtures.add_mixture("test_mt_tempered", ["mt_first_word", "mt_fill_blank"], maximum=6_000,
                       temperature=2.0)
  with pipeline.make_feed("test_mt_tempered", "validation", LENGTHS, batch_size=2,
                          objective=None, num_threads=0) as tempered:
    assert tempered.rates == [300 ** 0.5, 300 ** 0.5]


def test_pipeline_yields_a_batch(feed):
  batch = next(iter(feed))
  assert batch["encoder_input_tokens"].shape == (8, 64)
  assert batch["decoder_target_tokens"].shape == (8, 32)
  assert batch["encoder_input_tokens"].dtype == np.int32
  rows = batch["decoder_target_tokens"]
  assert all(1 in row for row in rows)  # Every target ends with EOS, nothing truncated.


def test_accuracy_and_sequence_accuracy():
  assert text_metrics.accuracy(["a", "b", "c"], ["a", "b", "x"]) == {
      "accuracy": pytest.approx(200 / 3)}
  assert round(text_metrics.accuracy([0, 1, 1], [0, 1, 0])["accuracy"], 2) == 66.67
  assert text_metrics.sequence_accuracy(["the cat", " b "], ["the cat ", "c"]) == {
      "sequence_accuracy": 50.0}


def test_classification_metrics_match_sklearn_definitions():
  targets, predictions = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
  precision, recall = 2 / 3, 2 / 3  # TP 2, FP 1, FN 1.
  assert text_metrics.f1_binary(targets, predictions)["f1"] == pytest.approx(
      100 * 2 * precision * recall / (precision + recall))
  tp, tn, fp, fn = 2, 1, 1, 1
  expected_mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  assert text_metrics.mcc(targets, predictions)["matthews_corrcoef"] == pytest.approx(
      100 * expected_mcc)
  # An invalid prediction is the wrong class: here a false negative and a false positive.
  assert text_metrics.f1_binary([1, 0, 1], [-1, -1, 1])["f1"] == pytest.approx(100 * 2 / 4)


def test_bleu_and_rouge():
  corpus = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]
  assert text_metrics.bleu(corpus, corpus) == {"bleu": pytest.approx(100.0)}
  predictions = ["the cat sat on a mat", "the quick brown fox jumped over a lazy dog"]
  direct = sacrebleu.corpus_bleu(predictions, [corpus], tokenize="intl", smooth_method="exp")
  assert text_metrics.bleu(corpus, predictions)["bleu"] == pytest.approx(direct.score)
  assert 0 < direct.score < 100
  two_refs = [[c, c.upper()] for c in corpus]
  assert text_metrics.bleu(two_refs, corpus)["bleu"] == pytest.approx(100.0)
  assert text_metrics.rouge(corpus, corpus) == {
      "rouge1": pytest.approx(100.0), "rouge2": pytest.approx(100.0),
      "rougeLsum": pytest.approx(100.0)}
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
  scores = [scorer.score(t, p) for t, p in zip(corpus, predictions)]
  got = text_metrics.rouge(corpus, predictions)
  for name in ("rouge1", "rouge2", "rougeLsum"):
    assert got[name] == pytest.approx(100 * np.mean([s[name].fmeasure for s in scores]))
  # By hand: "the cat sat" vs "the cat": unigram P 2/2, R 2/3, F 0.8.
  assert text_metrics.rouge(["the cat sat"], ["the cat"])["rouge1"] == pytest.approx(80.0)
  assert text_metrics.mean_log_likelihood(["a", "b"], [-1.0, -3.0]) == {
      "mean_log_likelihood": -2.0}


def test_metric_signatures_are_seqio_kinds():
  task = seqio.get_mixture_or_task("mt_continue")
  assert task.predict_metric_fns == [text_metrics.bleu, text_metrics.rouge]
  scored = seqio.Task("test_mt_scored", source=task.source, output_features=task.output_features,
                      metric_fns=[text_metrics.mean_log_likelihood, text_metrics.accuracy])
  assert scored.score_metric_fns == [text_metrics.mean_log_likelihood]
  assert scored.predict_metric_fns == [text_metrics.accuracy]


def test_text_metrics_imports_no_tensorflow_or_seqio():
  code = ("import sys\nfrom t5xlike import text_metrics\n"
          "text_metrics.accuracy([1], [1]); text_metrics.bleu(['a b'], ['a b'])\n"
          "text_metrics.rouge(['a b'], ['a b'])\n"
          "bad = [m for m in ('tensorflow', 'seqio', 'grain') if m in sys.modules]\n"
          "print(bad)\nsys.exit(1 if bad else 0)\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr

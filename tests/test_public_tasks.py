"""Public TFDS tasks (t5xlike.tasks.public), read offline under tfds.testing.mock_data."""
import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

import t5xlike.tasks.public as public
from t5xlike import text_metrics
from t5xlike.data import sources
from t5xlike.tasks import embedded

NUM_EXAMPLES = 6
# What each task's inputs and targets are, written out here from T5's GLUE format.
EXPECTED = {
    "glue_sst2": (lambda x: f"sst2 sentence: {x['sentence']}", ("negative", "positive")),
    "glue_mnli": (lambda x: f"mnli hypothesis: {x['hypothesis']} premise: {x['premise']}",
                  ("entailment", "neutral", "contradiction")),
    "super_glue_boolq": (lambda x: f"boolq passage: {x['passage']} question: {x['question']}",
                         ("False", "True")),
    "xsum": (lambda x: f"summarize: {x['document']}", None),
}
TFDS_NAMES = {"glue_sst2": "glue/sst2:2.0.0", "glue_mnli": "glue/mnli:2.0.0",
              "super_glue_boolq": "super_glue/boolq:1.0.2", "xsum": "xsum:1.1.0"}


def encode(text: str) -> np.ndarray:
  return np.asarray(embedded.vocabulary().encode(text), np.int32)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


@pytest.fixture(scope="module")
def mocked():
  """{(task, split): (t5xlike's examples, the raw TFDS examples)} under mock data."""
  read = {}
  with pytest.MonkeyPatch.context() as patch:
    # seqio memoizes TFDS builders per process; mocked ones must not outlive this module.
    patch.setattr(seqio.utils.LazyTfdsLoader, "_MEMOIZED_BUILDERS", {})
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
      for task in public.TASKS:
        for split in task.splits[:2]:
          raw = list(tfds.load(task.tfds_name, split=split).as_numpy_iterator())
          read[task.name, split] = sources.load_in_memory(task.name, split), raw
  return read


def test_tasks_registered_with_tfds_names_and_metrics():
  assert [task.name for task in public.TASKS] == list(EXPECTED)
  for name, tfds_name in TFDS_NAMES.items():
    task = seqio.get_mixture_or_task(name)
    assert task.source.tfds_dataset.name == tfds_name
    assert task.output_features["inputs"].vocabulary == embedded.vocabulary()
  assert seqio.get_mixture_or_task("glue_mnli").splits == (
      "train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")
  assert seqio.get_mixture_or_task("glue_sst2").metric_fns == [text_metrics.accuracy]
  assert seqio.get_mixture_or_task("xsum").metric_fns == [text_metrics.rouge]
  public.register()  # Idempotent.


def test_examples_follow_the_template(mocked):
  for (name, split), (source, raw) in mocked.items():
    render, labels = EXPECTED[name]
    assert len(source) == len(raw) == NUM_EXAMPLES, (name, split)
    for example, x in zip(source, raw):
      x = {key: _text(value) for key, value in x.items()}
      np.testing.assert_array_equal(example["inputs"], encode(render(x)))
      if labels is None:
        np.testing.assert_array_equal(example["targets"], encode(x["summary"]))
      else:
        np.testing.assert_array_equal(example["targets"], encode(labels[x["label"]]))
        target = embedded.vocabulary().decode(example["targets"].tolist())
        assert target in labels
        task = seqio.get_mixture_or_task(name)
        assert task.postprocess_fn(target, example={}, is_target=True) == labels.index(target)


def test_unlabelled_examples_get_unk():
  data = tf.data.Dataset.from_tensor_slices({"label": np.array([1, -1, 0], np.int64)})
  texts = [x["label_text"].decode() for x in
           public.label_to_text(("negative", "positive"))(data).as_numpy_iterator()]
  assert texts == ["positive", "<unk>", "negative"]


def test_string_label_to_class_id_and_accuracy():
  classes = ("entailment", "neutral", "contradiction")
  to_id = lambda text: public.string_label_to_class_id(text, label_classes=classes)
  assert [to_id(t) for t in ("neutral", " contradiction\n", "maybe", "")] == [1, 2, -1, -1]
  targets = [to_id(t) for t in ("entailment", "neutral", "contradiction")]
  predictions = [to_id(t) for t in ("entailment", "neutral", "banana")]
  assert round(text_metrics.accuracy(targets, predictions)["accuracy"], 2) == 66.67
  xsum = seqio.get_mixture_or_task("xsum")
  assert xsum.postprocess_fn(" a summary. ", example={}, is_target=False) == "a summary."

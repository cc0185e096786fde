"""Public benchmark tasks by their TFDS names, text-to-text in T5's style.

Registered tasks (TFDS dataset and version of tensorflow-datasets 4.9;
splits as TFDS names them; metric):
  glue_sst2         glue/sst2:2.0.0          train, validation, test       accuracy
      "sst2 sentence: {sentence}"  ->  negative | positive
  glue_mnli         glue/mnli:2.0.0          train, validation_matched,    accuracy
                                             validation_mismatched,
                                             test_matched, test_mismatched
      "mnli hypothesis: {hypothesis} premise: {premise}"
          ->  entailment | neutral | contradiction
  super_glue_boolq  super_glue/boolq:1.0.2   train, validation, test       accuracy
      "boolq passage: {passage} question: {question}"  ->  False | True
  xsum              xsum:1.1.0               train, validation, test       rouge
      "summarize: {document}"  ->  {summary}

Inputs name the benchmark and then each text feature as "key: value" in
alphabetical order of the keys, as T5's GLUE preprocessor writes them;
targets are the TFDS label names. Unlabelled examples (label -1, the test
splits of GLUE and SuperGLUE) get the target "<unk>", as in T5.

Evaluation: a classification task's `postprocess_fn` is
`string_label_to_class_id`, which turns the decoded target and prediction
into the label's class id (-1 for text that is no label), so `accuracy`
compares class ids; xsum's strips whitespace. Evaluate on `validation`
(`validation_matched` and `validation_mismatched` for MNLI); test labels are
hidden.

The vocabulary is the embedded SentencePiece model (`t5xlike.tasks.embedded`): T5's
is not available offline; bind another `seqio.Feature` vocabulary for real
runs. The data must be prepared in the TFDS data directory
(`tfds build glue/sst2` etc.): t5xlike refuses to download while reading.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

from t5xlike import text_metrics
from t5xlike.tasks import embedded, prompts
from t5xlike.tasks.prompts import Template

UNKNOWN_LABEL = "<unk>"


@dataclasses.dataclass(frozen=True)
class PublicTask:
  """A TFDS dataset as a text-to-text task."""
  name: str
  tfds_name: str
  splits: tuple[str, ...]
  template: Template
  metric_fns: tuple[Callable, ...]
  label_names: tuple[str, ...] = ()  # Classification: targets are these names.


def glue_template(benchmark: str, keys: Sequence[str]) -> Template:
  """T5's GLUE text: '<benchmark> <key>: {key} ...' (keys sorted) -> '{label_text}'."""
  inputs = " ".join([benchmark] + [f"{key}: {{{key}}}" for key in sorted(keys)])
  return Template(inputs, "{label_text}")


TASKS = (
    PublicTask("glue_sst2", "glue/sst2:2.0.0", ("train", "validation", "test"),
               glue_template("sst2", ["sentence"]), (text_metrics.accuracy,),
               ("negative", "positive")),
    PublicTask("glue_mnli", "glue/mnli:2.0.0",
               ("train", "validation_matched", "validation_mismatched", "test_matched",
                "test_mismatched"),
               glue_template("mnli", ["premise", "hypothesis"]), (text_metrics.accuracy,),
               ("entailment", "neutral", "contradiction")),
    PublicTask("super_glue_boolq", "super_glue/boolq:1.0.2", ("train", "validation", "test"),
               glue_template("boolq", ["question", "passage"]), (text_metrics.accuracy,),
               ("False", "True")),
    PublicTask("xsum", "xsum:1.1.0", ("train", "validation", "test"),
               Template("summarize: {document}", "{summary}"), (text_metrics.rouge,)),
)
BY_NAME = {task.name: task for task in TASKS}


def string_label_to_class_id(text: str, label_classes: Sequence[str], default: int = -1,
                             **unused_kwargs) -> int:
  """postprocess_fn: the index of `text.strip()` in `label_classes`, else `default`."""
  text = text.strip()
  return list(label_classes).index(text) if text in label_classes else default


def strip(text: str, **unused_kwargs) -> str:
  """postprocess_fn: the decoded text without surrounding whitespace."""
  return text.strip()


def label_to_text(label_names: Sequence[str]):
  """A preprocessor adding 'label_text': the name of the int 'label' ('<unk>' for -1)."""
  names = tuple(label_names)

  def add_label_text(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    label = tf.cast(x["label"], tf.int32)
    name = tf.gather(tf.constant(names), tf.maximum(label, 0))
    return {**x, "label_text": tf.where(label < 0, tf.constant(UNKNOWN_LABEL), name)}

  def label_names_to_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.map(add_label_text, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return label_names_to_text


def _register_task(task: PublicTask) -> None:
  vocabulary = embedded.vocabulary()
  preprocessors = [label_to_text(task.label_names)] if task.label_names else []
  preprocessors += [prompts.apply_templates([task.template]),
                    seqio.preprocessors.tokenize,
                    seqio.CacheDatasetPlaceholder(),
                    seqio.preprocessors.append_eos_after_trim]
  postprocess = (functools.partial(string_label_to_class_id, label_classes=task.label_names)
                 if task.label_names else strip)
  seqio.TaskRegistry.add(
      task.name,
      source=seqio.TfdsDataSource(tfds_name=task.tfds_name, splits=task.splits),
      preprocessors=preprocessors,
      output_features={key: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)
                       for key in ("inputs", "targets")},
      postprocess_fn=postprocess,
      metric_fns=list(task.metric_fns))


def register() -> None:
  """Registers the tasks above (idempotent)."""
  for task in TASKS:
    if task.name not in seqio.TaskRegistry.names():
      _register_task(task)


register()

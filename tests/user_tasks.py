"""seqio tasks written the way T5X users write theirs (test fixtures for t5xlike.data.sources).

Importing this module registers:
  user_function_qa      FunctionDataSource over in-memory question/answer
                        strings: rekey, tokenize, CacheDatasetPlaceholder(),
                        append_eos_after_trim (EOS on inputs and targets).
  user_text_lines       TextLineDataSource over `tests/data/user_qa.tsv`
                        (question TAB answer), parsed by a user preprocessor.
  user_tfds_imdb        TfdsDataSource over imdb_reviews/plain_text (tests run
                        it offline under `tfds.testing.mock_data`).
  user_random_postcache a random post-cache preprocessor (`seeds`), which
                        t5xlike refuses.
  user_postcache_filter a deterministic post-cache preprocessor, also refused.
  user_mixture          user_function_qa + user_text_lines.
"""
from __future__ import annotations

import functools
import pathlib

import seqio
import tensorflow as tf

from t5xlike.tasks import embedded

TSV_PATH = pathlib.Path(__file__).resolve().parent / "data" / "user_qa.tsv"
TFDS_NAME = "imdb_reviews/plain_text:1.0.0"

QA = {
    "train": [("What is the capital of France?", "Paris."),
              ("How many legs does a spider have?", "Eight legs."),
              ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
              ("What do bees make?", "Honey."),
              ("Which planet is red?", "Mars, the red planet.")],
    "validation": [("What is two plus two?", "Four."),
                   ("What colour is a clear sky?", "Blue.")],
}


def qa_dataset(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
  del shuffle_files, seed
  questions, answers = zip(*QA[split])
  return tf.data.Dataset.from_tensor_slices({"question": list(questions),
                                             "answer": list(answers)})


@seqio.map_over_dataset
def parse_tsv(line: tf.Tensor) -> dict[str, tf.Tensor]:
  fields = tf.strings.split(line, "\t")
  return {"inputs": fields[0], "targets": fields[1]}


@seqio.map_over_dataset(num_seeds=1)
def random_token_drop(x: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
  """Drops ~10% of target tokens at random (a user's noising step)."""
  keep = tf.random.stateless_uniform(tf.shape(x["targets"]), seed=seed) > 0.1
  return {**x, "targets": tf.boolean_mask(x["targets"], keep)}


def drop_empty_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
  return dataset.filter(lambda x: tf.size(x["targets"]) > 0)


def _features(add_eos: bool, inputs: bool = True) -> dict[str, seqio.Feature]:
  names = ("inputs", "targets") if inputs else ("targets",)
  return {name: seqio.Feature(embedded.vocabulary(), add_eos=add_eos, dtype=tf.int32)
          for name in names}


def register() -> None:
  """Registers the tasks above (idempotent)."""
  if "user_function_qa" in seqio.TaskRegistry.names():
    return
  qa_rekey = functools.partial(seqio.preprocessors.rekey,
                               key_map={"inputs": "question", "targets": "answer"})
  seqio.TaskRegistry.add(
      "user_function_qa",
      source=seqio.FunctionDataSource(qa_dataset, splits=("train", "validation")),
      preprocessors=[qa_rekey, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim],
      output_features=_features(add_eos=True),
      metric_fns=[])
  seqio.TaskRegistry.add(
      "user_text_lines",
      source=seqio.TextLineDataSource(split_to_filepattern={"train": str(TSV_PATH)}),
      preprocessors=[parse_tsv, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos],
      output_features=_features(add_eos=True),
      metric_fns=[])
  seqio.TaskRegistry.add(
      "user_tfds_imdb",
      source=seqio.TfdsDataSource(tfds_name=TFDS_NAME,
                                  splits={"train": "train", "validation": "test"}),
      preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
                     seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder()],
      output_features=_features(add_eos=False, inputs=False),
      metric_fns=[])
  seqio.TaskRegistry.add(
      "user_random_postcache",
      source=seqio.FunctionDataSource(qa_dataset, splits=("train", "validation")),
      preprocessors=[qa_rekey, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     random_token_drop, seqio.preprocessors.append_eos_after_trim],
      output_features=_features(add_eos=True),
      metric_fns=[])
  seqio.TaskRegistry.add(
      "user_postcache_filter",
      source=seqio.FunctionDataSource(qa_dataset, splits=("train", "validation")),
      preprocessors=[qa_rekey, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     drop_empty_targets],
      output_features=_features(add_eos=False),
      metric_fns=[])
  seqio.MixtureRegistry.add("user_mixture", [("user_function_qa", 1.0),
                                             ("user_text_lines", 1.0)])


register()

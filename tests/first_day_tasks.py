"""A T5X user's own task module, written the way T5X users write one (tests/test_first_day.py).

Importing it registers:
  first_day_qa                 TextLineDataSource over tests/data/first_day_{train,validation}.tsv
                               (inputs TAB targets), the user's own parser, seqio's tokenize,
                               CacheDatasetPlaceholder, append_eos_after_trim, and the user's
                               own metric function (`exact`).
  first_day_unscored           the same data, no metric functions (legitimate in seqio).
  first_day_broken_validation  a FunctionDataSource whose validation split cannot be read
                               (raises when read): a run that does not evaluate never reads it.
  first_day_mix                first_day_qa + first_day_unscored.
"""
from __future__ import annotations

import pathlib

import seqio
import tensorflow as tf

from t5xlike.tasks import embedded

DATA = pathlib.Path(__file__).resolve().parent / "data"


@seqio.map_over_dataset
def parse_tsv(line: tf.Tensor) -> dict[str, tf.Tensor]:
  """'inputs TAB targets' -> {'inputs', 'targets'} strings."""
  fields = tf.strings.split(line, "\t")
  return {"inputs": fields[0], "targets": fields[1]}


def exact(targets: list[str], predictions: list[str]) -> dict[str, float]:
  """The user's metric: the share of predictions equal to their target, in percent."""
  hits = sum(t.strip() == p.strip() for t, p in zip(targets, predictions))
  return {"exact": 100.0 * hits / max(len(targets), 1)}


def broken_dataset(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
  """Train rows from the TSV; the validation split fails when read."""
  del shuffle_files, seed
  if split != "train":
    raise OSError(f"the {split} split of first_day_broken_validation cannot be read")
  lines = (DATA / "first_day_train.tsv").read_text().splitlines()
  return tf.data.Dataset.from_tensor_slices(lines)


def _features() -> dict[str, seqio.Feature]:
  return {name: seqio.Feature(embedded.vocabulary(), add_eos=True)
          for name in ("inputs", "targets")}


def _preprocessors() -> list:
  return [parse_tsv, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim]


def register() -> None:
  """Registers the tasks above (idempotent)."""
  if "first_day_qa" in seqio.TaskRegistry.names():
    return
  files = {split: str(DATA / f"first_day_{split}.tsv") for split in ("train", "validation")}
  seqio.TaskRegistry.add(
      "first_day_qa", source=seqio.TextLineDataSource(split_to_filepattern=files),
      preprocessors=_preprocessors(), output_features=_features(), metric_fns=[exact])
  seqio.TaskRegistry.add(
      "first_day_unscored", source=seqio.TextLineDataSource(split_to_filepattern=files),
      preprocessors=_preprocessors(), output_features=_features(), metric_fns=[])
  seqio.TaskRegistry.add(
      "first_day_broken_validation",
      source=seqio.FunctionDataSource(broken_dataset, splits=("train", "validation")),
      preprocessors=_preprocessors(), output_features=_features(), metric_fns=[exact])
  seqio.MixtureRegistry.add("first_day_mix", [("first_day_qa", 1.0),
                                              ("first_day_unscored", 1.0)])


register()

"""Task fixtures for the fault drill (`scripts/fault_drill.py`, tests/test_reliability.py).

Importing this module registers:
  fault_empty_train   a task whose `train` split holds no example (its
                      `validation` split holds two), embedded vocabulary.
"""
from __future__ import annotations

import seqio
import tensorflow as tf

from t5xlike.tasks import embedded

TEXTS = {"train": [], "validation": ["A short document.", "Another short document."]}


def _dataset(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
  del shuffle_files, seed
  return tf.data.Dataset.from_tensor_slices(
      {"targets": tf.constant(TEXTS[split], dtype=tf.string)})


def register() -> None:
  """Registers the tasks above (idempotent)."""
  if "fault_empty_train" in seqio.TaskRegistry.names():
    return
  seqio.TaskRegistry.add(
      "fault_empty_train",
      source=seqio.FunctionDataSource(_dataset, splits=("train", "validation")),
      preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder()],
      output_features={"targets": seqio.Feature(embedded.vocabulary(), add_eos=False,
                                                dtype=tf.int32)},
      metric_fns=[])


register()

"""Small seqio tasks for the data selection tests (`MIXTURE_OR_TASK_MODULE=tests.selection_tasks`).

Importing this module registers:
  sel_count   the first 40 train / 6 validation examples of mt_count_words
              (its templates, metric and postprocessing), written the way users
              write tasks: FunctionDataSource, templates, tokenize,
              CacheDatasetPlaceholder(), append_eos_after_trim.
  sel_first   the same of mt_first_word (24 / 6).
  sel_pool    the mixture of both.
"""
from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from t5xlike.tasks import embedded, multitask, prompts

SIZES = {"sel_count": ("mt_count_words", 40), "sel_first": ("mt_first_word", 24)}
VALIDATION = 6


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *,
                source: str, count: int) -> tf.data.Dataset:
  del shuffle_files, seed
  rows = multitask.examples(source, split)[:count if split == "train" else VALIDATION]
  return tf.data.Dataset.from_tensor_slices({key: [row[key] for row in rows] for key in rows[0]})


def register() -> None:
  """Registers the tasks and the mixture (idempotent)."""
  for name, (source, count) in SIZES.items():
    if name in seqio.TaskRegistry.names():
      continue
    word_task = multitask.BY_NAME[source]
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            functools.partial(_dataset_fn, source=source, count=count),
            splits=("train", "validation")),
        preprocessors=[prompts.apply_templates(word_task.templates, seed=0),
                       seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                       seqio.preprocessors.append_eos_after_trim],
        output_features={key: seqio.Feature(embedded.vocabulary(), add_eos=True, dtype=tf.int32)
                         for key in ("inputs", "targets")},
        postprocess_fn=multitask.strip, metric_fns=list(word_task.metric_fns))
  if "sel_pool" not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add("sel_pool", [(name, count) for name, (_, count) in SIZES.items()])


register()

"""Examples of a task (or of each task of a mixture) for inference and evaluation.

Reads a split after the task's deterministic preprocessors, in file order,
through `sources.open_source` (in memory, or the task cache with
USE_CACHED_TASKS), and applies its post-cache EOS preprocessors, so the
examples are exactly what the model was trained on (without an objective).
"""
from __future__ import annotations

import importlib
import importlib.util
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import seqio

from t5xlike import errors
from t5xlike.data import feed_steps, pipeline, selected_task, seqio_tasks, sources


def import_module(module: str | None, flag: str = "MIXTURE_OR_TASK_MODULE") -> None:
  """Imports a module that registers tasks (`flag` names where it was given, for the
  message); ValueError in one line. A shipped task module under its old name
  (`tasks.multitask`) is answered with its name now (`t5xlike.tasks.multitask`)."""
  if module:
    try:
      importlib.import_module(module)
    except ImportError as error:
      renamed = shipped_task_module(module) if error.name == "tasks" else None
      reason = (f"the shipped task modules are t5xlike.tasks.*: use {renamed!r}" if renamed
                else errors.one_line(error))
      raise ValueError(f"{flag}={module!r} cannot be imported: {reason}") from None


def shipped_task_module(module: str) -> str | None:
  """`t5xlike.tasks.<x>` for `tasks.<x>` when t5xlike ships that module, else None.

  The repository's top-level `tasks/` is installed as `t5xlike.tasks` (setup.py).
  """
  top, _, rest = module.partition(".")
  if top != "tasks":
    return None
  renamed = f"t5xlike.tasks.{rest}" if rest else "t5xlike.tasks"
  try:
    return renamed if importlib.util.find_spec(renamed) is not None else None
  except ImportError:  # A parent of `renamed` is not a package.
    return None


def leaf_tasks(name: str, cache_dir: str | None = None) -> list[seqio.Task]:
  """The task, or the tasks of a mixture, in the mixture's order.

  A selection that `python -m t5xlike.select_data` wrote into `cache_dir`
  (TASK_CACHE_DIR) under `name` is registered first (`selected_task.register`).
  """
  if cache_dir:
    selected_task.register(name, cache_dir)
  return pipeline.resolve_tasks(seqio_tasks.get_task(name))


def read_split(task: seqio.Task, split: str, feature_lengths: Mapping[str, int], *,
               use_cached: bool, cache_dir: str | None,
               max_examples: int | None = None,
               mode_switching: Any = None) -> list[dict[str, np.ndarray]]:
  """The first `max_examples` (all if None) examples of a task split, with the
  task's post-cache EOS appended as in training (trimmed to length - 1 first), and
  the task's UL2 paradigm token first in the inputs as in training (`mode_switching`,
  an `objectives.mode_switching.ModeSwitching`; None: none).

  Args:
    task: the seqio task (not a mixture).
    split: the split to read.
    feature_lengths: TASK_FEATURE_LENGTHS (where EOS features are trimmed).
    use_cached: USE_CACHED_TASKS: read the task cache.
    cache_dir: where task caches live.
    max_examples: read at most this many examples, in file order (None: all).

  Returns:
    One dict per example in the `sources` format (token features int32 [length]);
    ValueError for an empty split.
  """
  examples, eos_features = read_source_split(task, split, use_cached=use_cached,
                                             cache_dir=cache_dir, max_examples=max_examples)
  eos_id = next(iter(task.output_features.values())).vocabulary.eos_id
  switching = feed_steps.checked_mode_switching(mode_switching, None, [task])
  if switching is not None:
    vocabulary = feed_steps.inputs_vocabulary(task)
    examples = [switching.apply(ex, task.name, vocabulary) for ex in examples]
  return [feed_steps.append_eos(ex, eos_features, feature_lengths, eos_id) for ex in examples]


def read_source_split(task: seqio.Task, split: str, *, use_cached: bool, cache_dir: str | None,
                      max_examples: int | None = None
                      ) -> tuple[list[dict[str, np.ndarray]], tuple[str, ...]]:
  """(the first `max_examples` examples of a task split as its source serves them, before
  EOS; the features that get EOS after trimming): `read_split` without the EOS step.
  ValueError for an empty split."""
  source = sources.open_source(task, split, use_cached=use_cached, cache_dir=cache_dir)
  if isinstance(source, sources.SequentialSource):
    with source:
      examples = list(itertools.islice(source.iterate(), max_examples))
  else:
    count = len(source) if max_examples is None else min(max_examples, len(source))
    examples = [source[i] for i in range(count)]
  if not examples:
    raise ValueError(f"{task.name}/{split} holds no example")
  return examples, tuple(source.eos_features)


def read_source_splits(task: seqio.Task, splits: Sequence[str], *, use_cached: bool,
                       cache_dir: str | None
                       ) -> tuple[dict[str, list[dict[str, np.ndarray]]], tuple[str, ...]]:
  """({split: examples before EOS} for each of `splits` that the task has, in that order;
  the features that get EOS): `read_source_split` over several splits. A ConfigError naming
  the task for an empty split."""
  out: dict[str, list[dict[str, np.ndarray]]] = {}
  eos_features: tuple[str, ...] = ()
  try:
    for split in dict.fromkeys(splits):
      if split in task.splits:
        out[split], eos_features = read_source_split(task, split, use_cached=use_cached,
                                                     cache_dir=cache_dir)
  except ValueError as error:
    raise errors.ConfigError(f"task {task.name!r}: {errors.one_line(error)}") from None
  return out, eos_features


def text_row(task: seqio.Task, example: dict[str, np.ndarray]) -> dict[str, Any]:
  """{'inputs', 'targets'} decoded with the task's vocabularies (EOS dropped)."""
  row: dict[str, Any] = {}
  for name in ("inputs", "targets"):
    if name in example and name in task.output_features:
      row[name] = task.output_features[name].vocabulary.decode(
          [int(i) for i in example[name]])
  return row


def read_tasks(name: str, split: str, feature_lengths: Mapping[str, int], *,
               module: str | None = None, use_cached: bool = False,
               cache_dir: str | None = None, max_examples: int | None = None,
               mode_switching: Any = None
               ) -> list[tuple[str, list[dict[str, Any]], list[dict[str, np.ndarray]]]]:
  """[(task name, decoded text rows, token examples)] of each task of `name`.

  Args:
    name: a registered seqio task or mixture (a mixture: each of its tasks, in order).
    split: the split to read.
    feature_lengths: TASK_FEATURE_LENGTHS.
    module: MIXTURE_OR_TASK_MODULE, imported first (it registers the tasks).
    use_cached: USE_CACHED_TASKS: read the task caches.
    cache_dir: where task caches live.
    max_examples: at most this many examples per task (None: all).
    mode_switching: each task's UL2 paradigm token, as in training (`read_split`).
  """
  import_module(module)
  jobs = []
  for task in leaf_tasks(name, cache_dir):
    examples = read_split(task, split, feature_lengths, use_cached=use_cached,
                          cache_dir=cache_dir, max_examples=max_examples,
                          mode_switching=mode_switching)
    jobs.append((task.name, [text_row(task, ex) for ex in examples], examples))
  return jobs

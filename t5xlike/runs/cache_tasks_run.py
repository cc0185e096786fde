"""The run behind `python -m t5xlike.cache_tasks`: validate the task splits, then write caches."""
from __future__ import annotations

import time

import seqio

from t5xlike import errors
from t5xlike.data import seqio_tasks, task_cache, task_datasets


def plan(task_names: list[str], splits: list[str]) -> list[tuple[seqio.Task, str]]:
  """(task, split) pairs to cache, validated (nothing written); ValueError on bad input.

  A mixture name stands for its tasks; no `splits` means every split of each task.
  """
  tasks: dict[str, seqio.Task] = {}
  for name in task_names:
    found = seqio_tasks.get_task(name)
    for task in found.tasks if isinstance(found, seqio.Mixture) else [found]:
      tasks.setdefault(task.name, task)
  pairs = []
  for task in tasks.values():
    seqio_tasks.check_postcache_preprocessors(task)
    try:
      task_splits = splits or list(task.splits)
    except errors.ConfigError as error:  # e.g. a Hugging Face dataset that does not exist
      raise errors.ConfigError(f"task {task.name!r}: {error}") from None
    for split in task_splits:
      task_datasets.deterministic_dataset(task, split)  # Split, TFDS data and features.
      pairs.append((task, split))
  return pairs


def _summary(stats: dict, seconds: float) -> str:
  tokens = ", ".join(f"{k} {v['tokens']:,}" for k, v in stats["features"].items() if v["token"])
  return (f"{stats['task']}/{stats['split']}: {stats['num_examples']:,} examples, tokens: "
          f"{tokens or 'none'}, {seconds:.1f} s")


def write(pairs: list[tuple[seqio.Task, str]], output_dir: str, num_shards: int | None) -> None:
  """Writes the cache of each (task, split) under `output_dir`; one line per split."""
  for task, split in pairs:
    start = time.time()
    stats = task_cache.write_cache(task, split, output_dir, num_shards=num_shards)
    print(_summary(stats, time.time() - start), flush=True)

"""Random-access example sources for seqio tasks.

A split of a seqio task is read as the examples left after the task's
*deterministic preprocessors*: `task.source.get_dataset(split, shuffle=False)`
followed by `task.preprocess_precache(dataset)`, i.e. everything before
`seqio.CacheDatasetPlaceholder()` in `task.preprocessors`. A task without a
placeholder is read up to its first preprocessor that takes a `seed`/`seeds`
argument or appends EOS; the remainder is checked like post-cache
preprocessors.

Example format: a dict from feature name to NumPy array, holding only the
features named in `task.output_features` whose values are numeric. *Token
features* (integer, rank 1: what a vocabulary produced) are int32 `[length]`;
other numeric features are kept as TensorFlow produced them (e.g. a float
`[]`). String features and features outside `task.output_features` (ids,
raw text, labels not declared as output features) are dropped. Arrays are
read-only: a consumer that wants to edit one copies it first.

What comes *after* the placeholder is not run: t5xlike draws per-example
randomness in NumPy objectives, seeded by (seed, example index), and does not
run TensorFlow per example after the cache.
`seqio_tasks.check_postcache_preprocessors` therefore refuses every post-cache preprocessor except
`seqio.preprocessors.append_eos` / `append_eos_after_trim`, whose work (EOS on
`[k for k, f in task.output_features.items() if f.add_eos]`) t5xlike's
pipeline does itself after trimming; sources report those features as
`eos_features`. seqio's own TensorFlow read of a split (the deterministic
preprocessors through tf.data) is `task_datasets.deterministic_dataset`.

Sources (`name`, `split`, `eos_features` on all of them):
  InMemorySource   a list of examples (tests, small tasks; `load_in_memory`).
  CachedSource     a task cache written by `t5xlike.data.task_cache`
                   (`python -m t5xlike.cache_tasks`): ArrayRecord shards.
  DirectSource     `t5xlike.data.direct_sources`: a TFDS dataset prepared as
                   ArrayRecord, local text files or a Hugging Face dataset
                   (`hf_sources.HfDatasetSource`), read by index, the
                   deterministic preprocessors (rekey, tokenize, ...)
                   replayed outside tf.data: no tf.data pipeline, no cache.
  SequentialSource large uncached tasks: the deterministic preprocessors in
                   file order, resumed by position; no random access.
Random-access sources have `__len__`, `__getitem__(i) -> example`,
`__getitems__(indices)` and `token_lengths(feature) -> int64 [len]`, and
serve the same examples in the same order (example i is the i-th of seqio's
TensorFlow read of the split).

`open_source` picks one. USE_CACHED_TASKS=True: the cache. Otherwise: in
memory when the split has at most `in_memory_max_examples` examples, else
the direct source when the task qualifies (after checking its first
examples against TensorFlow), else in file order; the log says which and
why.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Generator, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import seqio
from etils import epath

from t5xlike.data import direct_sources, preprocessor_replay, seqio_tasks, task_cache, task_datasets

log = logging.getLogger(__name__)

Example = task_datasets.Example
CACHE_COMMAND = "python -m t5xlike.cache_tasks"


class SplitTooLargeError(ValueError):
  """The split has more examples than `load_in_memory` may hold."""


class RandomAccessSource(Protocol):
  """What the shuffled pipeline reads: examples by index."""
  name: str  # The seqio task.
  split: str
  eos_features: tuple[str, ...]  # Features that get EOS after trimming.

  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> Example: ...
  def __getitems__(self, indices: Sequence[int]) -> list[Example]: ...
  def token_lengths(self, feature: str) -> np.ndarray: ...


def _input_count(task: seqio.Task, split: str) -> float | None:
  """The source's example count where known (before preprocessing; may be inf)."""
  try:
    count = task.num_input_examples(split)
  except (KeyError, ValueError, NotImplementedError):  # e.g. TFDS info without splits.
    return None
  return None if count is None else float(count)


# -- sources ------------------------------------------------------------------
class InMemorySource:
  """Examples held in a list (takes ownership: arrays become read-only)."""

  def __init__(self, examples: Sequence[Mapping[str, Any]], *, name: str = "in_memory",
               split: str = "train", eos_features: Sequence[str] = ()):
    self.name, self.split, self.eos_features = name, split, tuple(eos_features)
    self._examples = []
    for raw in examples:
      example = {key: np.asarray(value) for key, value in raw.items()}
      for value in example.values():
        value.setflags(write=False)
      self._examples.append(example)
    self._lengths: dict[str, np.ndarray] = {}

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> Example:
    return self._examples[index]

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    return [self._examples[i] for i in indices]

  def token_lengths(self, feature: str) -> np.ndarray:
    """Length of `feature` in every example: int64 [len(self)]."""
    if feature not in self._lengths:
      if self._examples and any(feature not in e or e[feature].ndim != 1 for e in self._examples):
        raise KeyError(f"{self.name}/{self.split}: {feature!r} is not a token feature of "
                       f"every example")
      self._lengths[feature] = np.array([len(e[feature]) for e in self._examples], np.int64)
    return self._lengths[feature]

  def __repr__(self) -> str:
    return f"InMemorySource({self.name}/{self.split}, {len(self)} examples)"


class CachedSource:
  """A task cache written by `task_cache.write_cache`, read by index (`task_cache.open_cache`:
  every shard opened at once, one generation even if the cache is replaced)."""

  def __init__(self, directory: str | epath.PathLike):
    opened = task_cache.open_cache(directory)  # One generation, even across a replacement.
    self.directory, self.stats = opened.directory, opened.stats
    self.name, self.split = self.stats["task"], self.stats["split"]
    self.eos_features = tuple(self.stats["eos_features"])
    self._records = opened.records
    if len(self._records) != self.stats["num_examples"]:
      raise ValueError(f"task cache {self.directory} is damaged: {len(self._records)} records, "
                       f"stats.json says {self.stats['num_examples']}")
    self._lengths: dict[str, np.ndarray] = opened.lengths

  def __len__(self) -> int:
    return int(self.stats["num_examples"])

  def __getitem__(self, index: int) -> Example:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    return task_cache.decode(self._records[index % len(self)])

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    return [task_cache.decode(r) for r in self._records.__getitems__(list(indices))]

  def token_lengths(self, feature: str) -> np.ndarray:
    """Length of `feature` in every example: int64 [len(self)] (from lengths.<feature>.npy)."""
    if feature not in self._lengths:
      task_cache.read_lengths(self.directory, self.stats, feature)  # KeyError naming the features.
    return self._lengths[feature]

  def __repr__(self) -> str:
    return f"CachedSource({self.directory}, {len(self)} examples)"


def _close_all(streams: list[Generator[Example, None, None]]) -> None:
  for stream in streams:
    stream.close()
  streams.clear()


class SequentialSource:
  """A split read in file order through TensorFlow, resumable by position only.

  For large uncached tasks (USE_CACHED_TASKS=False): no random access, hence
  no global shuffle. One iterator is open at a time; `close()` releases it
  (a tf.data iterator left to the garbage collector may block whichever
  thread destroys it).
  """

  def __init__(self, task: seqio.Task | str, split: str):
    self.task = seqio_tasks.resolve_task(task)
    self.name, self.split = self.task.name, split
    self.eos_features = tuple(seqio_tasks.check_postcache_preprocessors(self.task))
    task_datasets.check_split(self.task, split)
    self._open: list[Generator[Example, None, None]] = []
    weakref.finalize(self, _close_all, self._open)  # Safety net at interpreter exit.

  def iterate(self, start: int = 0) -> Iterator[Example]:
    """Examples from position `start` (skipping `start` examples); closes the previous iterator."""
    self.close()
    stream = task_datasets.iterate_examples(self.task, self.split, start)
    self._open.append(stream)
    return stream

  def close(self) -> None:
    _close_all(self._open)

  def __enter__(self) -> SequentialSource:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def load_in_memory(task: seqio.Task | str, split: str,
                   max_examples: int = 200_000) -> InMemorySource:
  """Runs the deterministic preprocessors once and holds the examples in memory.

  Raises SplitTooLargeError (a ValueError) naming `cache_tasks` when the
  split has more than `max_examples` examples (counted before preprocessing
  where the source knows, else while reading). A TFDS dataset that
  TensorFlow cannot read (prepared as ArrayRecord only) is read through its
  direct source.
  """
  task = seqio_tasks.resolve_task(task)
  eos = seqio_tasks.check_postcache_preprocessors(task)
  task_datasets.check_split(task, split)
  too_large = SplitTooLargeError(
      f"{task.name}/{split} has more than {max_examples} examples to hold in memory: cache it "
      f"with {CACHE_COMMAND} --tasks={task.name} --output_dir=DIR and set USE_CACHED_TASKS=True")
  if not task_datasets.tensorflow_reads(task, split):
    direct, _ = _open_direct(task, split)
    if direct is not None:
      return _direct_in_memory(direct, max_examples, too_large)
    # Raises: neither TensorFlow nor a direct reader.
    task_datasets.check_tensorflow_reads(task, split)
  count = _input_count(task, split)
  if count is not None and count > max_examples:
    raise too_large
  stream = task_datasets.iterate_examples(task, split)
  try:
    examples = [example for _, example in zip(range(max_examples + 1), stream)]
  finally:
    stream.close()
  if len(examples) > max_examples:
    raise too_large
  return InMemorySource(examples, name=task.name, split=split, eos_features=eos)


def _direct_in_memory(direct: direct_sources.DirectSource, max_examples: int,
                      too_large: Exception) -> InMemorySource:
  if len(direct) > max_examples:
    raise too_large
  return InMemorySource(direct.__getitems__(range(len(direct))), name=direct.name,
                        split=direct.split, eos_features=direct.eos_features)


def _open_direct(task: seqio.Task,
                 split: str) -> tuple[direct_sources.DirectSource | None, str | None]:
  """(DirectSource, None), or (None, why the task split cannot be read directly)."""
  try:
    return direct_sources.DirectSource(task, split), None
  except preprocessor_replay.NotDirect as reason:
    return None, str(reason)


def open_source(mixture_or_task_name_or_task: seqio.Task | str, split: str, *, use_cached: bool,
                cache_dir: str | None, in_memory_max_examples: int = 200_000
                ) -> CachedSource | InMemorySource | direct_sources.DirectSource | SequentialSource:
  """The source of one task split (a mixture is refused: open each task).

  use_cached=True: the cache `cache_dir/<task>/<split>` (ValueError with the
  `cache_tasks` command when missing). use_cached=False, in this order:
    1. in memory (`load_in_memory`) when the split has at most
       `in_memory_max_examples` examples;
    2. a `direct_sources.DirectSource` (random access, preprocessors replayed
       outside tf.data) when the task qualifies and its first examples equal
       TensorFlow's;
    3. a SequentialSource (file order, no global shuffle).
  The log names the choice and the reason (DEBUG for in memory and the cache, INFO for a
  direct read, WARNING for file order).

  Args:
    mixture_or_task_name_or_task: a seqio task or its registered name.
    split: the split to read.
    use_cached: USE_CACHED_TASKS: read the task cache.
    cache_dir: where task caches live (`cache_dir/<task>/<split>`).
    in_memory_max_examples: the most examples a split read into memory may hold.
  """
  task = seqio_tasks.resolve_task(mixture_or_task_name_or_task)
  seqio_tasks.check_postcache_preprocessors(task)
  task_datasets.check_split(task, split, need_data=not use_cached)
  if use_cached:
    return _open_cached(task, split, cache_dir)
  direct, why = _open_direct(task, split)
  if direct is None:
    # Neither TensorFlow nor a direct reader: say why.
    task_datasets.check_tensorflow_reads(task, split)
  count = len(direct) if direct is not None else _input_count(task, split)
  if count is None or count <= in_memory_max_examples:
    try:
      if direct is not None and not direct.tensorflow_reads:
        source = _direct_in_memory(direct, in_memory_max_examples, SplitTooLargeError())
      else:
        source = load_in_memory(task, split, max_examples=in_memory_max_examples)
    except SplitTooLargeError:
      pass
    else:
      # DEBUG (`--verbose`): the usual case, one line per task and split of a mixture.
      log.debug("read %s/%s into memory%s: %d examples (random access, global shuffle; up to %d "
               "examples are held in memory)", task.name, split,
               "" if direct is None or direct.tensorflow_reads else " through its direct reader",
               len(source), in_memory_max_examples)
      return source
  if direct is not None:
    try:
      direct.verify()
    except preprocessor_replay.NotDirect as reason:
      why = f"its direct reader differs from seqio's TensorFlow read: {reason}"
      log.warning("%s/%s: %s", task.name, split, why)
    else:
      log.info("reading %s/%s directly: %d examples by random access from %s (global shuffle), "
               "preprocessors %s replayed outside tf.data (more than %d "
               "examples to hold in memory)", task.name, split, len(direct), direct.description,
               ", ".join(seqio_tasks.precache_names(task)) or "none", in_memory_max_examples)
      return direct
  log.warning("reading %s/%s in file order: no global shuffle (cache it with %s --tasks=%s "
              "--output_dir=DIR for a shuffled, random-access pipeline; not read directly: %s)",
              task.name, split, CACHE_COMMAND, task.name, why)
  return SequentialSource(task, split)


def _open_cached(task: seqio.Task, split: str, cache_dir: str | None) -> CachedSource:
  command = f"{CACHE_COMMAND} --tasks={task.name} --output_dir={cache_dir or 'DIR'}"
  if not cache_dir:
    raise ValueError(f"USE_CACHED_TASKS=True needs a task cache directory; write one with "
                     f"{command}")
  directory = epath.Path(cache_dir) / task.name / split
  if not task_cache.is_cache(directory) and not task_cache.wait_for_replacement(directory):
    raise ValueError(f"task {task.name} has no cache in {cache_dir}: run {command}")
  source = CachedSource(directory)
  if source.stats["precache_preprocessors"] != seqio_tasks.precache_names(task):
    log.warning("the cache of %s/%s was written with preprocessors %s, the task now has %s: "
                "rerun %s if they changed", task.name, split,
                source.stats["precache_preprocessors"], seqio_tasks.precache_names(task), command)
  log.debug("reading %s/%s from the cache %s: %d examples", task.name, split, directory,
            len(source))
  return source


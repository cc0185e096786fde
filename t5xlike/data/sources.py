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
run TensorFlow per example after the cache. `check_postcache_preprocessors`
therefore refuses every post-cache preprocessor except
`seqio.preprocessors.append_eos` / `append_eos_after_trim`, whose work (EOS on
`[k for k, f in task.output_features.items() if f.add_eos]`) t5xlike's
pipeline does itself after trimming; sources report those features as
`eos_features`.

Sources (`name`, `split`, `eos_features` on all of them):
  InMemorySource   a list of examples (tests, small tasks; `load_in_memory`).
  CachedSource     a task cache written by `t5xlike.data.task_cache`
                   (`python -m t5xlike.cache_tasks`): ArrayRecord shards.
  DirectSource     `t5xlike.data.direct_sources`: a TFDS dataset prepared as
                   ArrayRecord, or local text files, read by index, the
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

import difflib
import inspect
import logging
import weakref
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from t5xlike.data import preprocessor_replay, task_cache

log = logging.getLogger(__name__)

Example = dict[str, np.ndarray]
# Seed of the seqio map-seed manager while running the deterministic part, so
# that a pre-cache preprocessor which does take seeds draws the same numbers in
# every run (seqio warns about such preprocessors; a cache holds one draw).
PRECACHE_SEED = 0
CACHE_COMMAND = "python -m t5xlike.cache_tasks"
_EOS_PREPROCESSORS = (seqio.preprocessors.append_eos, seqio.preprocessors.append_eos_after_trim)
OBJECTIVE_HINT = ("t5xlike draws per-example randomness in objectives (train_run.train.objective, "
                  "e.g. span_corruption.SpanCorruption / ul2.UL2)")


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


# -- tasks --------------------------------------------------------------------
def get_task(name: str) -> seqio.Task | seqio.Mixture:
  """The registered seqio task or mixture, or a ValueError naming the known ones."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ValueError(f"unknown task or mixture {name!r}; {hint}registered: "
                     f"{', '.join(known) or 'none (is MIXTURE_OR_TASK_MODULE right?)'}") from None


def resolve_task(task_or_name: seqio.Task | str) -> seqio.Task:
  """A seqio task from itself or its name; a mixture is refused (open its tasks)."""
  task = get_task(task_or_name) if isinstance(task_or_name, str) else task_or_name
  if isinstance(task, seqio.Mixture):
    raise ValueError(f"{task.name!r} is a mixture; open each of its tasks "
                     f"({', '.join(t.name for t in task.tasks)})")
  return task


def _name(preprocessor: Any) -> str:
  return seqio.utils.function_name(preprocessor)


def _seed_argument(preprocessor: Any) -> str | None:
  """'seed' or 'seeds' when the preprocessor takes one (seqio's random convention)."""
  try:
    parameters = inspect.signature(preprocessor).parameters
  except (TypeError, ValueError):
    return None
  return next((arg for arg in ("seeds", "seed") if arg in parameters), None)


def _is_eos(preprocessor: Any) -> bool:
  return preprocessor_replay.unwrap_partial(preprocessor)[0] in _EOS_PREPROCESSORS


def split_preprocessors(task: seqio.Task) -> tuple[list[Any], list[Any]]:
  """(deterministic part, the rest) of `task.preprocessors`.

  With a `CacheDatasetPlaceholder` the split is at the placeholder (seqio's
  pre-cache/post-cache); without one, at the first preprocessor that takes
  `seed`/`seeds` or appends EOS.
  """
  preprocessors = list(task.preprocessors)
  for i, preprocessor in enumerate(preprocessors):
    if isinstance(preprocessor, seqio.CacheDatasetPlaceholder):
      return preprocessors[:i], preprocessors[i + 1:]
  for i, preprocessor in enumerate(preprocessors):
    if _seed_argument(preprocessor) or _is_eos(preprocessor):
      return preprocessors[:i], preprocessors[i:]
  return preprocessors, []


def check_postcache_preprocessors(task: seqio.Task) -> list[str]:
  """The features that get EOS after trimming; ValueError for any other post-cache step.

  Allowed after the placeholder: `seqio.preprocessors.append_eos` and
  `append_eos_after_trim` only ("EOS handled by t5xlike's pipeline"); the
  returned list is then `[k for k, f in task.output_features.items() if
  f.add_eos]`, else empty. A preprocessor taking `seed`/`seeds` is refused
  with a pointer to objectives (t5xlike cannot replay seqio's seeds per
  example). Any other, deterministic, preprocessor is refused too: t5xlike
  does not run TensorFlow per example after the cache, so it belongs before
  the placeholder (or, when it needs `sequence_length`, is t5xlike's own
  trimming/packing).
  """
  eos = False
  for preprocessor in split_preprocessors(task)[1]:
    name = _name(preprocessor)
    if _seed_argument(preprocessor):
      raise ValueError(f"task {task.name!r}: post-cache preprocessor {name} takes random seeds "
                       f"({_seed_argument(preprocessor)}); {OBJECTIVE_HINT}: remove {name} from "
                       f"task {task.name} and bind the objective instead")
    if _is_eos(preprocessor):
      eos = True
      continue
    raise ValueError(f"task {task.name!r}: post-cache preprocessor {name} is not supported: "
                     f"t5xlike runs no TensorFlow per example after seqio.CacheDatasetPlaceholder "
                     f"(only append_eos/append_eos_after_trim, done by its own pipeline); move "
                     f"{name} before the placeholder, or leave trimming and packing to t5xlike")
  return [k for k, f in task.output_features.items() if f.add_eos] if eos else []


def check_split(task: seqio.Task, split: str, *, need_data: bool = True) -> None:
  """ValueError unless the task has the split (and, with need_data, its TFDS data is prepared)."""
  if need_data:
    _check_tfds_prepared(task, split)  # An unprepared TFDS dataset knows no splits.
  elif (isinstance(task.source, seqio.TfdsDataSource)
        and not task.source._splits):  # pylint: disable=protected-access
    return  # Its splits come from TFDS metadata, which a cache-only machine may lack.
  if split not in task.splits:
    raise ValueError(f"task {task.name!r} has no split {split!r} "
                     f"(splits: {', '.join(task.splits) or 'none'})")


def _check_tfds_prepared(task: seqio.Task, split: str) -> None:
  """ValueError with the command to prepare a TFDS dataset that is not prepared.

  seqio's TfdsDataSource would otherwise call `tfds.load(download=True)`.
  """
  if not isinstance(task.source, seqio.TfdsDataSource):
    return
  loader = task.source.tfds_dataset
  if loader.tfds_splits is not None and split not in loader.tfds_splits:
    return  # check_split names the split.
  name, _ = loader.get_split_params(split)
  try:
    builder = loader._get_builder(split)  # pylint: disable=protected-access  (seqio memoizes it)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"task {task.name!r} reads TFDS dataset {name!r}, which "
                     f"tensorflow-datasets {tfds.__version__} does not know") from None
  if builder.is_prepared():
    return
  try:  # Fails fast, without downloading; succeeds under tfds.testing.mock_data.
    builder.as_dataset(split=None)
  except AssertionError:
    root = builder.data_dir_root
    raise ValueError(
        f"task {task.name!r} reads TFDS dataset {name} (version {builder.version}), which is not "
        f"prepared in {root}: prepare it with `tfds build {name} --data_dir={root}` or "
        f"tfds.builder({name!r}, data_dir={root!r}).download_and_prepare()") from None


def _tensorflow_reads(task: seqio.Task, split: str) -> bool:
  """False for a TFDS dataset prepared only in a format tfds.load cannot read (ArrayRecord)."""
  if not isinstance(task.source, seqio.TfdsDataSource):
    return True
  from t5xlike.data import direct_sources  # pylint: disable=g-import-not-at-top
  loader = task.source.tfds_dataset
  return direct_sources.tensorflow_reads_tfds(
      loader._get_builder(split))  # pylint: disable=protected-access


def _check_tensorflow_reads(task: seqio.Task, split: str) -> None:
  if not _tensorflow_reads(task, split):
    loader = task.source.tfds_dataset
    name, _ = loader.get_split_params(split)
    builder = loader._get_builder(split)  # pylint: disable=protected-access
    raise ValueError(
        f"task {task.name!r} reads TFDS dataset {name}, prepared as "
        f"{builder.info.file_format.value} only, which TensorFlow (tfds.load) cannot read: "
        f"t5xlike reads such datasets by random access, without tf.data and without a task "
        f"cache, when the task's preprocessors before seqio.CacheDatasetPlaceholder are "
        f"seqio's rekey/tokenize (t5xlike.data.direct_sources); otherwise prepare it as "
        f"tfrecord too (tfds build {name} --data_dir={builder.data_dir_root})")


def _dataset_options() -> tf.data.Options:
  """tf.data without autotuning: its background model thread, competing with
  XLA for the cores, made destroying an iterator take tens of seconds."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return options


def _kept_features(task: seqio.Task, spec: Mapping[str, tf.TensorSpec]) -> dict[str, bool]:
  """{feature: is a token feature} for the numeric output features present."""
  kept = {}
  for name, feature in task.output_features.items():
    if name not in spec:
      if feature.required:
        raise ValueError(f"task {task.name!r}: output feature {name!r} is missing after the "
                         f"deterministic preprocessors (tokenize before "
                         f"seqio.CacheDatasetPlaceholder)")
      continue
    dtype = spec[name].dtype
    if dtype.is_integer or dtype.is_floating or dtype.is_bool:
      kept[name] = dtype.is_integer and spec[name].shape.rank == 1
  return kept


def deterministic_dataset(task: seqio.Task, split: str) -> tuple[tf.data.Dataset, dict[str, bool]]:
  """(tf.data dataset of the split after the deterministic preprocessors, kept features).

  In file order, autotune off; kept features map name -> is a token feature.
  """
  check_split(task, split)
  _check_tensorflow_reads(task, split)
  dataset = task.source.get_dataset(split=split, shuffle=False)
  precache, _ = split_preprocessors(task)
  if task.supports_caching:
    dataset = task.preprocess_precache(dataset, seed=PRECACHE_SEED)
  else:
    with seqio.utils.map_seed_manager(PRECACHE_SEED):
      for preprocessor in precache:
        dataset = seqio.utils.add_kwargs_to_transform(
            preprocessor, sequence_length=None, output_features=task.output_features)(dataset)
  return dataset.with_options(_dataset_options()), _kept_features(task, dataset.element_spec)


def precache_names(task: seqio.Task) -> list[str]:
  """Names of the deterministic preprocessors (recorded in a cache's stats)."""
  return [_name(p) for p in split_preprocessors(task)[0]]


def to_example(raw: Mapping[str, Any], features: Mapping[str, bool]) -> Example:
  """The kept features of one tf.data NumPy example, read-only (tokens int32 [length])."""
  example = {}
  for name, is_token in features.items():
    value = np.asarray(raw[name])
    if is_token:
      value = value.astype(np.int32, copy=False)
    value.setflags(write=False)
    example[name] = value
  return example


def iterate_examples(task: seqio.Task, split: str, start: int = 0) -> Iterator[Example]:
  """Examples of the split from position `start`, in file order (close the generator when done)."""
  dataset, features = deterministic_dataset(task, split)
  iterator = iter(dataset.skip(start).as_numpy_iterator())
  try:
    for raw in iterator:
      yield to_example(raw, features)
  finally:
    del iterator  # Releases the TensorFlow iterator in this thread.


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


def _close_all(streams: list) -> None:
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
    self.task = resolve_task(task)
    self.name, self.split = self.task.name, split
    self.eos_features = tuple(check_postcache_preprocessors(self.task))
    check_split(self.task, split)
    self._open: list = []
    weakref.finalize(self, _close_all, self._open)  # Safety net at interpreter exit.

  def iterate(self, start: int = 0) -> Iterator[Example]:
    """Examples from position `start` (skipping `start` examples); closes the previous iterator."""
    self.close()
    stream = iterate_examples(self.task, self.split, start)
    self._open.append(stream)
    return stream

  def close(self) -> None:
    _close_all(self._open)

  def __enter__(self) -> "SequentialSource":
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
  task = resolve_task(task)
  eos = check_postcache_preprocessors(task)
  check_split(task, split)
  too_large = SplitTooLargeError(
      f"{task.name}/{split} has more than {max_examples} examples to hold in memory: cache it "
      f"with {CACHE_COMMAND} --tasks={task.name} --output_dir=DIR and set USE_CACHED_TASKS=True")
  if not _tensorflow_reads(task, split):
    direct, _ = _open_direct(task, split)
    if direct is None:
      _check_tensorflow_reads(task, split)  # Raises: neither TensorFlow nor a direct reader.
    return _direct_in_memory(direct, max_examples, too_large)
  count = _input_count(task, split)
  if count is not None and count > max_examples:
    raise too_large
  stream = iterate_examples(task, split)
  try:
    examples = [example for _, example in zip(range(max_examples + 1), stream)]
  finally:
    stream.close()
  if len(examples) > max_examples:
    raise too_large
  return InMemorySource(examples, name=task.name, split=split, eos_features=eos)


def _direct_in_memory(direct, max_examples: int, too_large: Exception) -> InMemorySource:
  if len(direct) > max_examples:
    raise too_large
  return InMemorySource(direct.__getitems__(range(len(direct))), name=direct.name,
                        split=direct.split, eos_features=direct.eos_features)


def _open_direct(task: seqio.Task, split: str):
  """(DirectSource, None), or (None, why the task split cannot be read directly)."""
  from t5xlike.data import direct_sources  # pylint: disable=g-import-not-at-top
  try:
    return direct_sources.DirectSource(task, split), None
  except preprocessor_replay.NotDirect as reason:
    return None, str(reason)


def open_source(mixture_or_task_name_or_task: seqio.Task | str, split: str, *, use_cached: bool,
                cache_dir: str | None, in_memory_max_examples: int = 200_000
                ) -> ("CachedSource | InMemorySource | direct_sources.DirectSource | "
                      "SequentialSource"):
  """The source of one task split (a mixture is refused: open each task).

  use_cached=True: the cache `cache_dir/<task>/<split>` (ValueError with the
  `cache_tasks` command when missing). use_cached=False, in this order:
    1. in memory (`load_in_memory`) when the split has at most
       `in_memory_max_examples` examples;
    2. a `direct_sources.DirectSource` (random access, preprocessors replayed
       outside tf.data) when the task qualifies and its first examples equal
       TensorFlow's;
    3. a SequentialSource (file order, no global shuffle).
  The log names the choice and the reason.
  """
  task = resolve_task(mixture_or_task_name_or_task)
  check_postcache_preprocessors(task)
  check_split(task, split, need_data=not use_cached)
  if use_cached:
    return _open_cached(task, split, cache_dir)
  direct, why = _open_direct(task, split)
  if direct is None:
    _check_tensorflow_reads(task, split)  # Neither TensorFlow nor a direct reader: say why.
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
      log.info("read %s/%s into memory%s: %d examples (random access, global shuffle; up to %d "
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
               ", ".join(precache_names(task)) or "none", in_memory_max_examples)
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
  if source.stats["precache_preprocessors"] != precache_names(task):
    log.warning("the cache of %s/%s was written with preprocessors %s, the task now has %s: "
                "rerun %s if they changed", task.name, split,
                source.stats["precache_preprocessors"], precache_names(task), command)
  log.info("reading %s/%s from the cache %s: %d examples", task.name, split, directory,
           len(source))
  return source


"""The deterministic, resumable data pipeline (grain), one per process.

    source (random access: in-memory or task cache) -> chunks of the
    objective's lengths (`ChunkedSource`: one length, or a cycle of them,
    UL2's denoisers each cut at its own) -> global shuffle by a seeded
    permutation of indices, a fresh one each epoch (`MapDataset.shuffle` +
    `repeat`) -> the objective's transform seeded by (seed, task, epoch,
    example index) -> [Masked Thought: the targets as the decoder reads them,
    seeded by (seed, task, epoch, example index, its stream)] -> mixture of
    tasks by rates (`MapDataset.mix`) -> this process's share (every P-th
    element) -> [packing: grain's first-fit packer] -> batches of BATCH_SIZE / P
    rows -> model features.

Every step is a function of (seed, position), so the iterator state is a
position: `get_state()` is saved with each checkpoint and `set_state()`
resumes with exactly the batches an uninterrupted run would have seen.
The union over processes of their k-th batches is the k-th global batch
(positions [k B, (k + 1) B)), so an unpacked state (k) resumes under any
number of processes; packed rows depend on each process's own stream, so a
packed state is refused under another process count.

Mixture rates (seqio's `Mixture`): a number is a fixed rate; a callable is
called with the task (seqio's `mixing_rate_num_examples` and friends), or,
for `t5xlike.data.mixing` rates, with the task's example count. grain's
mix interleaves the tasks deterministically in proportion to the rates.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Generator, Mapping
from typing import Any

import grain
import numpy as np
import seqio

from t5xlike.data import (
  chunking,
  feature_converters,
  feed_steps,
  feeding,
  masked_thought as masked_thought_lib,
  mixing,
  packing,
  seqio_tasks,
  sources,
)
from t5xlike.objectives import base as objectives_base, mode_switching as mode_switching_lib

log = logging.getLogger(__name__)

#: Format version of `get_state()`; a checkpoint from another format is refused.
STATE_VERSION = 1


def resolve_tasks(mixture_or_task: seqio.Task | seqio.Mixture) -> list[seqio.Task]:
  """The tasks of a mixture (in its order), or [task]."""
  if isinstance(mixture_or_task, seqio.Mixture):
    return list(mixture_or_task.tasks)
  return [mixture_or_task]


def _seed32(*values: int) -> int:
  """A 32-bit seed derived from integers (grain's shuffle takes seeds < 2**32)."""
  return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


class _Indexed:
  """Random-access source of (index, example) pairs."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    return int(index), self.source[int(index)]


def _examples_in(batch: Mapping[str, np.ndarray]) -> int:
  """Examples in a batch: rows, or the segments of packed rows."""
  for key in ("decoder_segment_ids", "encoder_segment_ids"):
    if key in batch:
      return int(batch[key].max(axis=1).sum())
  return len(next(iter(batch.values())))


_SOURCES: dict[tuple[Any, ...], Any] = {}


def _open_source(task: seqio.Task, split: str, use_cached: bool, cache_dir: str | None,
                 in_memory_max_examples: int):
  """`sources.open_source`, remembering random-access sources (evaluation builds a
  pipeline for every evaluation; the in-memory preprocessing runs once)."""
  key = (id(task), task.name, split, use_cached, cache_dir, in_memory_max_examples)
  if key in _SOURCES:
    return _SOURCES[key]
  source = sources.open_source(task, split, use_cached=use_cached, cache_dir=cache_dir,
                               in_memory_max_examples=in_memory_max_examples)
  if not isinstance(source, sources.SequentialSource):
    if not len(source):
      raise ValueError(f"task {task.name!r} split {split!r} holds no example (an empty split: "
                       f"check the task's data for {split!r})")
    if len(_SOURCES) >= 16:  # Bounded: each holds a split (in memory) or open files.
      _SOURCES.pop(next(iter(_SOURCES)))
    _SOURCES[key] = source
  return source


class SequentialOnly(ValueError):
  """A task split that can only be read in order (large and not cached)."""


class Pipeline:
  """Batches of a seqio task or mixture split for one process.

  Args:
    mixture_or_task_name: a registered seqio task or mixture.
    split: the split to read.
    feature_lengths: TASK_FEATURE_LENGTHS.
    batch_size: the global batch size (all processes together).
    objective: turns token chunks into model examples; None: the task's own
      examples (supervised), EOS appended where the task's features say so.
    seed: RANDOM_SEED: shuffling and the objective's randomness.
    num_epochs: None repeats forever; else that many passes (the last
      incomplete batch dropped).
    process_index, process_count: this process's share.
    feature_converter: the model's converter (`feature_converters.CONVERTERS`).
    use_cached: USE_CACHED_TASKS: read task caches (`python -m t5xlike.cache_tasks`).
    cache_dir: where task caches live.
    pack: pack several examples per row (segment ids and positions).
    shuffle: shuffle globally (False: source order, e.g. for inspection).
    num_threads: grain's read threads (0: read in the calling thread).
    masked_thought: masks the teacher-forced decoder inputs of each example
      (`data.masked_thought`); None or a rate of 0: off.
    mode_switching: UL2 mode switching (`objectives.mode_switching`): each task's
      paradigm token prepended to its examples' inputs (supervised only).
  """

  def __init__(self, mixture_or_task_name: str, split: str, feature_lengths: Mapping[str, int],
               batch_size: int, objective: objectives_base.Objective | None, *, seed: int = 0,
               num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
               feature_converter: str = "encoder_decoder", use_cached: bool = False,
               cache_dir: str | None = None, pack: bool = False, shuffle: bool = True,
               num_threads: int = 2, in_memory_max_examples: int = 200_000,
               masked_thought: masked_thought_lib.MaskedThought | None = None,
               mode_switching: mode_switching_lib.ModeSwitching | None = None):
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f"BATCH_SIZE={batch_size} must be positive and divisible by the "
                       f"number of processes ({process_count})")
    self.task = seqio_tasks.get_task(mixture_or_task_name)
    self.split = split
    self.feature_lengths = dict(feature_lengths)
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.objective = objective
    self.seed = int(seed)
    self.num_epochs = num_epochs
    self.process_index, self.process_count = process_index, process_count
    self.converter_name = feature_converter
    self.convert = feature_converters.get_converter(feature_converter)
    self.pack = pack
    self.shuffle = shuffle
    self.num_threads = num_threads
    self.masked_thought = masked_thought if masked_thought and masked_thought.active else None
    if self.masked_thought is not None:
      self.masked_thought.check_converter(feature_converter)
    self.tasks = resolve_tasks(self.task)
    self.sources = []
    for task in self.tasks:  # open_source checks the split and the post-cache preprocessors.
      source = _open_source(task, split, use_cached, cache_dir, in_memory_max_examples)
      if isinstance(source, sources.SequentialSource):
        source.close()
        raise SequentialOnly(f"{task.name}/{split} is read in file order")
      self.sources.append(source)
    self.vocabulary, self.chunk_lengths = feed_steps.prepare_objective(
        self.tasks[0], objective, self.feature_lengths, feature_converter)
    self.vocab_size, self.eos_id = self.vocabulary.vocab_size, self.vocabulary.eos_id
    self.mode_switching = feed_steps.checked_mode_switching(mode_switching, objective,
                                                            self.tasks)
    # What each task's examples are: its source, or chunks of its token stream (chunk
    # lengths come only with an objective).
    chunk_lengths = self.chunk_lengths
    self.task_examples: list[sources.RandomAccessSource | chunking.ChunkedSource] = [
        source if chunk_lengths is None or objective is None else
        chunking.ChunkedSource(source, objective.source_feature, chunk_lengths)
        for source in self.sources]
    self.examples_per_task = [len(examples) for examples in self.task_examples]
    self.rates = self._rates()
    self._iterator: grain.DatasetIterator | None = None
    self._state: dict[str, Any] | None = None
    self._batches = 0  # Global batches consumed.
    self._truncation = feed_steps.TruncationCount(f"{self.task.name}/{split}")
    self._loader_seconds = 0.0
    self._loader_examples = 0
    self._last_efficiency = 0.0

  # -- construction -----------------------------------------------------------
  def _rates(self) -> list[float]:
    if len(self.tasks) == 1:
      return [1.0]
    own = self.task.rate_per_task_name  # Direct members; sub-mixtures through seqio.
    rates = [mixing.resolve_rate(own[task.name], task, count) if task.name in own
             else self.task.get_rate(task)
             for task, count in zip(self.tasks, self.examples_per_task)]
    if min(rates) < 0 or sum(rates) <= 0:
      raise ValueError(f"mixture {self.task.name!r} has rates {rates}: need >= 0, sum > 0")
    return rates

  def _transform(self, position: int, item, *, t: int, count: int, with_raw: bool):
    index, raw = item
    epoch = position // count
    if self.objective is None:
      eos_features = self.sources[t].eos_features
      self._truncation.add(feed_steps.truncated_features(raw, eos_features,
                                                         self.feature_lengths))
      if self.mode_switching is not None:
        raw = self.mode_switching.apply(raw, self.tasks[t].name,
                                        feed_steps.inputs_vocabulary(self.tasks[t]))
      features = feed_steps.append_eos(raw, eos_features, self.feature_lengths, self.eos_id)
    else:
      rng = np.random.default_rng([self.seed, t, epoch, index])
      examples = self.task_examples[t]
      slot = examples.slot(index) if isinstance(examples, chunking.ChunkedSource) else 0
      features = self.objective.transform_chunk(raw[self.objective.source_feature], slot, rng,
                                                vocab_size=self.vocab_size, eos_id=self.eos_id)
    if self.masked_thought is not None:
      features = self.masked_thought.apply(
          features, masked_thought_lib.example_rng(self.seed, t, epoch, index),
          vocab_size=self.vocab_size, target_length=self.feature_lengths["targets"])
    return (raw, features) if with_raw else features

  def _mixed(self, with_raw: bool = False) -> grain.MapDataset:
    """The examples of all processes, in global order (before sharding)."""
    datasets = []
    for t, examples in enumerate(self.task_examples):
      ds = grain.MapDataset.source(_Indexed(examples))
      if self.shuffle:
        ds = ds.shuffle(seed=_seed32(self.seed, t))
      ds = ds.repeat(self.num_epochs)
      ds = ds.map_with_index(functools.partial(self._transform, t=t, count=len(examples),
                                               with_raw=with_raw))
      datasets.append(ds)
    if len(datasets) == 1:
      return datasets[0]
    positive = [(d, r) for d, r in zip(datasets, self.rates) if r > 0]
    return grain.MapDataset.mix([d for d, _ in positive], [r for _, r in positive])

  def _dataset(self) -> grain.IterDataset:
    ds = self._mixed()[self.process_index::self.process_count]
    lengths = self.feature_lengths
    if not self.pack:
      # Batches by random access: local batch k of every process is a share of
      # global batch k, whatever the number of processes.
      ds = ds.batch(self.local_batch_size, drop_remainder=True,
                    batch_fn=lambda examples: self.convert(examples, lengths))
      return ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                                  prefetch_buffer_size=4))
    ds = ds.map(functools.partial(packing.prepare_for_packing, self.converter_name,
                                  feature_lengths=lengths))
    # Elements are examples here (batches in the unpacked path): two per packed row.
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self.num_threads, prefetch_buffer_size=max(2 * self.local_batch_size, 1)))
    # The packer's seed: (seed, 1 << 20), a stream no task index reaches (the shuffles
    # use (seed, task index)).
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=packing.pack_lengths(self.converter_name, lengths,
                                               read_targets=self.masked_thought is not None),
        num_packing_bins=self.local_batch_size, seed=_seed32(self.seed, 1 << 20),
        shuffle_bins=False)
    return ds.batch(self.local_batch_size, drop_remainder=True,
                    batch_fn=lambda rows: packing.packed_batch(self.converter_name, rows,
                                                               lengths))

  # -- state ------------------------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: global batches consumed, and grain's iterator state."""
    iterator_state = self._iterator.get_state() if self._iterator is not None else self._state
    return {"version": STATE_VERSION, "process_count": self.process_count, "pack": self.pack,
            "batches": self._batches, "iterator": iterator_state}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Resumes at a saved position. Unpacked, the position is a global batch index,
    valid for any number of processes; packed rows depend on each process's
    stream, so a packed state is refused under another process count."""
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"the checkpoint's data state has format {state.get('version')!r}, "
                       f"this pipeline {STATE_VERSION}: start a new MODEL_DIR from the "
                       "checkpoint with INITIAL_CHECKPOINT_PATH")
    if bool(state.get("pack")) != self.pack:
      raise ValueError(f"the checkpoint's data state was saved with pack={state.get('pack')}, "
                       f"this run has pack={self.pack}: start a new MODEL_DIR from the "
                       "checkpoint with INITIAL_CHECKPOINT_PATH")
    if self.pack and state["process_count"] != self.process_count:
      raise ValueError(
          f"the checkpoint's packed data state was saved by {state['process_count']} "
          f"process(es), this run has {self.process_count}: packed rows cannot be carried "
          "over (resume with the same number of processes, or start a new MODEL_DIR from this "
          "checkpoint with INITIAL_CHECKPOINT_PATH)")
    self.close()
    self._batches = int(state["batches"])
    self._state = state["iterator"] if self.pack else {"next_index": self._batches}

  def close(self) -> None:
    if self._iterator is not None:
      close = getattr(self._iterator, "close", None)
      if close is not None:
        close()
    self._iterator = None

  def __enter__(self) -> Pipeline:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- iteration --------------------------------------------------------------
  def __iter__(self) -> Pipeline:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """The next global batch's local rows: features [B / process_count, length]."""
    start = time.perf_counter()
    iterator = self._iterator
    if iterator is None:
      self._iterator = iterator = iter(self._dataset())
      if self._state is not None:
        iterator.set_state(self._state)
    try:
      batch = next(iterator)
    except StopIteration:
      self._state = iterator.get_state()
      self.close()
      raise
    self._batches += 1
    if self._batches == feed_steps.TRUNCATION_REPORT_AFTER_BATCHES:
      self._truncation.report_once()
    self._loader_seconds += time.perf_counter() - start
    self._loader_examples += _examples_in(batch)
    self._last_efficiency = packing.packing_efficiency(batch)
    return batch

  def metrics(self) -> dict[str, float]:
    """Loader figures since the last call: examples/s while the trainer waited
    for data, and the non-padding fraction of the last batch."""
    rate = self._loader_examples / self._loader_seconds if self._loader_seconds else 0.0
    self._loader_seconds, self._loader_examples = 0.0, 0
    return {"loader_examples_per_second": rate, "packing_efficiency": self._last_efficiency}

  def examples(self) -> Generator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
                                  None, None]:
    """(raw, transformed) examples in global order, for inspection (one epoch of
    the mixture at most; independent of the batch position)."""
    ds = self._mixed(with_raw=True)
    for position in range(len(ds)):
      yield ds[position]


def make_feed(mixture_or_task_name: str, split: str, feature_lengths: Mapping[str, int],
              batch_size: int, objective: objectives_base.Objective | None,
              **kwargs: Any) -> Pipeline | feeding.SequentialFeed:
  """The shuffled, random-access `Pipeline`, or, for a large task read without a
  cache, the in-order reader (`feeding.SequentialFeed`, resumable by position).

  Args:
    mixture_or_task_name: a registered seqio task or mixture.
    split: the split to read.
    feature_lengths: TASK_FEATURE_LENGTHS.
    batch_size: the global batch size (all processes together).
    objective: turns token chunks into model examples; None: the task's own examples.
    **kwargs: the other arguments of `Pipeline`; those the in-order reader lacks
      (caching, packing, shuffling, threads) are dropped for it.
  """
  try:
    return Pipeline(mixture_or_task_name, split, feature_lengths, batch_size, objective,
                    **kwargs)
  except SequentialOnly as reason:
    log.warning("%s: no global shuffle (cache it with python -m t5xlike.cache_tasks for a "
                "shuffled, random-access pipeline)", reason)
    for key in ("use_cached", "cache_dir", "pack", "shuffle", "num_threads",
                "in_memory_max_examples"):
      kwargs.pop(key, None)
    return feeding.SequentialFeed(mixture_or_task_name, split, feature_lengths, batch_size,
                                  objective, **kwargs)

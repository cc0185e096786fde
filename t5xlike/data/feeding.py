"""In-order reading of a seqio task or mixture, resumable by position.

The fallback of `pipeline.make_feed` for task splits that are too large to
hold in memory and have no task cache (USE_CACHED_TASKS=False): the task's
preprocessors run through `seqio` (TensorFlow) in file order, with no
global shuffle. For an objective that works on plain text (span
corruption, UL2, LM, ...) the token stream of successive documents is
concatenated and cut into chunks of the objective's lengths, as T5 does
(`reduce_concat_tokens` + `split_tokens`; a cycle of lengths where the
objective gives one, `Objective.chunk_lengths`). Example `i` of the stream is
transformed with a NumPy generator seeded by `(seed, i)`, so the position in
the stream (the number of examples consumed) is the whole iterator state:
restoring it replays exactly the batches an uninterrupted run would have
seen. Cached or small tasks go through the shuffled grain pipeline
(`t5xlike.data.pipeline`) instead.
"""
from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Generator, Iterator, Mapping

import numpy as np
import seqio

from t5xlike.data import (
  feature_converters,
  feed_steps,
  masked_thought as masked_thought_lib,
  seqio_tasks,
  sources,
)
from t5xlike.objectives import base as objectives_base, mode_switching as mode_switching_lib

log = logging.getLogger(__name__)


def _close_all(streams: list[Generator[dict[str, np.ndarray], None, None]]) -> None:
  for stream in streams:
    stream.close()
  streams.clear()


class SequentialFeed:
  """Batches of a seqio task split for one process, read in file order.

  Args:
    mixture_or_task_name: a registered seqio task (a mixture needs random
      access to its tasks: cache them).
    split: the split to read (`train`, `validation`, ...).
    feature_lengths: TASK_FEATURE_LENGTHS, e.g. {'inputs': 128, 'targets': 29}.
    batch_size: the global batch size (all processes together).
    objective: transforms token sequences into inputs/targets; None means the
      task already yields `inputs`/`targets` (supervised).
    seed: seeds the objective per example.
    num_epochs: None repeats forever; otherwise the feed ends after that many
      passes and the last incomplete batch is dropped.
    process_index, process_count: this process's share of each global batch
      (rows `[p * B / P, (p + 1) * B / P)`).
    feature_converter: name of the converter that makes model features
      (`feature_converters.CONVERTERS`; a model's `feature_converter`).
    masked_thought: masks the teacher-forced decoder inputs (`data.masked_thought`;
      example i draws from the pipeline's (seed, 0, 0, i) layout, in its own stream).
    mode_switching: UL2 mode switching (`objectives.mode_switching`; supervised only).
  """

  def __init__(self, mixture_or_task_name: str, split: str, feature_lengths: Mapping[str, int],
               batch_size: int, objective: objectives_base.Objective | None, seed: int = 0,
               num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
               feature_converter: str = "encoder_decoder",
               masked_thought: masked_thought_lib.MaskedThought | None = None,
               mode_switching: mode_switching_lib.ModeSwitching | None = None):
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f"BATCH_SIZE={batch_size} must be positive and divisible by the "
                       f"number of processes ({process_count})")
    task = seqio_tasks.get_task(mixture_or_task_name)
    if isinstance(task, seqio.Mixture):
      raise ValueError(f"mixture {task.name!r} has a task too large to hold in memory and "
                       "no task cache: mixtures need random access, cache its tasks with "
                       "python -m t5xlike.cache_tasks and set USE_CACHED_TASKS=True")
    self.task = task
    self._source = sources.SequentialSource(task, split)  # Checks split and preprocessors.
    self.eos_features = self._source.eos_features
    self.split = split
    self.feature_lengths = dict(feature_lengths)
    self.batch_size = batch_size
    self._truncation = feed_steps.TruncationCount(f"{task.name}/{split}")
    self.objective = objective
    self.seed = seed
    self.num_epochs = num_epochs
    self.local_rows = slice(process_index * batch_size // process_count,
                            (process_index + 1) * batch_size // process_count)
    self.convert = feature_converters.get_converter(feature_converter)
    self.masked_thought = masked_thought if masked_thought and masked_thought.active else None
    if self.masked_thought is not None:
      self.masked_thought.check_converter(feature_converter)
    self.vocabulary, self.chunk_lengths = feed_steps.prepare_objective(
        task, objective, self.feature_lengths, feature_converter)
    self.vocab_size, self.eos_id = self.vocabulary.vocab_size, self.vocabulary.eos_id
    self.mode_switching = feed_steps.checked_mode_switching(mode_switching, objective, [task])
    self._position = 0  # Examples consumed (global, across processes).
    # The generator of raw examples, when open.
    self._stream: Generator[dict[str, np.ndarray], None, None] | None = None
    self._examples: Iterator[dict[str, np.ndarray]] | None = None
    # Safety net for feeds nobody closed: close at interpreter exit, while
    # TensorFlow's threads are still alive.
    self._open_streams: list[Generator[dict[str, np.ndarray], None, None]] = []
    weakref.finalize(self, _close_all, self._open_streams)

  # -- state ----------------------------------------------------------------
  def get_state(self) -> dict[str, int]:
    return {"examples": int(self._position)}

  def set_state(self, state: Mapping[str, int]) -> None:
    self.close()
    self._position = int(state["examples"])

  def metrics(self) -> dict[str, float]:
    """Loader figures for the train rows: none for the in-order reader."""
    return {}

  def close(self) -> None:
    """Releases the TensorFlow iterator now.

    A tf.data iterator left to the garbage collector can be destroyed in
    any thread at any time (or during interpreter shutdown), where its
    destructor may wait a long time for its worker threads; closing the
    feed explicitly keeps that out of the training loop.
    """
    if self._stream is not None:
      self._stream.close()
      self._open_streams.remove(self._stream)
    self._source.close()
    self._stream = None
    self._examples = None

  def __enter__(self) -> SequentialFeed:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- iteration ------------------------------------------------------------
  def _documents(self) -> Iterator[Mapping[str, np.ndarray]]:
    """The task's examples after its deterministic preprocessors, epoch after epoch."""
    epochs = itertools.count() if self.num_epochs is None else range(self.num_epochs)
    for epoch in epochs:
      count = 0
      for doc in self._source.iterate(0):
        count += 1
        yield doc
      if count == 0:
        raise ValueError(f"split {self.split!r} of {self.task.name!r} is empty")
      log.debug("finished epoch %d of %s/%s", epoch, self.task.name, self.split)

  def _raw_examples(self) -> Generator[dict[str, np.ndarray], None, None]:
    """The untransformed example stream (chunks of text, or supervised pairs)."""
    cycle = self.chunk_lengths  # Set only with an objective (`prepare_objective`).
    if cycle is None or self.objective is None:
      for doc in self._documents():
        if self.mode_switching is not None:
          doc = self.mode_switching.apply(doc, self.task.name,
                                          feed_steps.inputs_vocabulary(self.task))
        self._truncation.add(feed_steps.truncated_features(doc, self.eos_features,
                                                           self.feature_lengths))
        yield feed_steps.append_eos(doc, self.eos_features, self.feature_lengths, self.eos_id)
      return
    pending: list[np.ndarray] = []
    size = 0
    source = self.objective.source_feature
    lengths = itertools.cycle(cycle)  # Chunk i is cut at cycle[i mod len(cycle)].
    length = next(lengths)
    for doc in self._documents():
      pending.append(np.asarray(doc[source], dtype=np.int32))
      size += len(pending[-1])
      while size >= length:
        stream = np.concatenate(pending)
        yield {source: stream[:length]}
        pending, size = [stream[length:]], len(stream) - length
        length = next(lengths)
    if size:
      yield {source: np.concatenate(pending)}

  def _transform(self, index: int, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    features = raw
    if self.objective is not None:
      # The pipeline's (seed, task, epoch, index) layout with task and epoch 0.
      rng = np.random.default_rng([self.seed, 0, 0, index])
      slot = index % len(self.chunk_lengths) if self.chunk_lengths else 0
      features = self.objective.transform_chunk(raw[self.objective.source_feature], slot, rng,
                                                vocab_size=self.vocab_size, eos_id=self.eos_id)
    if self.masked_thought is not None:
      features = self.masked_thought.apply(
          features, masked_thought_lib.example_rng(self.seed, 0, 0, index),
          vocab_size=self.vocab_size, target_length=self.feature_lengths["targets"])
    return features

  def examples(self) -> Generator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
                                  None, None]:
    """(raw, transformed) examples from the start of the stream (for inspection).

    Independent of the batch position; close the generator when done.
    """
    stream = self._raw_examples()
    try:
      for index, raw in enumerate(stream):
        yield raw, self._transform(index, raw)
    finally:
      stream.close()

  def __iter__(self) -> SequentialFeed:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """The next global batch's local rows: features [B / process_count, length]."""
    remaining = self._examples
    if remaining is None:
      self._stream = stream = self._raw_examples()
      self._open_streams.append(stream)
      self._examples = remaining = itertools.islice(stream, self._position, None)
    start = self._position
    raws = list(itertools.islice(remaining, self.batch_size))
    if len(raws) < self.batch_size:
      self.close()
      raise StopIteration
    rows = range(self.batch_size)[self.local_rows]
    examples = [self._transform(start + i, raws[i]) for i in rows]
    self._position = start + self.batch_size
    if self._position == feed_steps.TRUNCATION_REPORT_AFTER_BATCHES * self.batch_size:
      self._truncation.report_once()
    return self.convert(examples, self.feature_lengths)

"""Random access to seqio task splits without tf.data and without a cache ("direct" sources).

A task qualifies when its source and every deterministic (pre-cache)
preprocessor can be replayed outside tf.data, on the examples asked for:

  sources      `seqio.TfdsDataSource` whose TFDS dataset is prepared in a
               random-access format (ArrayRecord: `tfds build NAME
               --file_format=array_record`), read with `as_data_source`;
               `seqio.TextLineDataSource` over local files, read through a
               line-offset index of each file (memory-mapped);
               `hf_sources.HfDatasetSource` (Hugging Face `datasets`: a
               `save_to_disk` directory, local parquet / JSON lines / arrow
               files), read by row index.
  preprocessors `seqio.preprocessors.rekey`, `tokenize`,
               `tokenize_and_append_eos` (SentencePiece and byte vocabularies),
               and, for text lines, `parse_lines` / `parse_tsv` below (seqio
               preprocessors with a TensorFlow body for seqio and a Python
               replay here). Everything is Python/NumPy except SentencePiece
               tokenization, which calls the vocabulary's own tf_text op
               eagerly, once per read (a batch for `__getitems__`): the
               Python sentencepiece library segments ties differently from
               it in rare cases (`_encoder`), and the ids must be seqio's.

Example `i` of a direct source is example `i` of seqio's own TensorFlow read
of the split (`task.source.get_dataset(split, shuffle=False)` + the
pre-cache preprocessors): the files are visited in tf.data's interleave
order (`FileDataSource`'s and tfds's `cycle_length=16, block_length=16`,
`interleave_order`), lines follow `tf.data.TextLineDataset` ('\\n'
separates, every '\\r' is dropped, a last line without '\\n' counts when
it is not empty), and the kept features, dtypes and token ids are those of
`task_datasets.to_example`. `DirectSource.verify` checks the first examples
against TensorFlow before a source is used (where TensorFlow can read the
split at all: tfds.load cannot read ArrayRecord files, so a dataset prepared
only in that format is read directly or not at all).

Everything else (a user parse function, `FunctionDataSource`, TFRecord-only
TFDS datasets, remote files) raises `NotDirect` with the reason; the task
is then read in memory, from the task cache or in file order
(`sources.open_source`).
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from t5xlike import library_compat
from t5xlike.data import hf_sources, seqio_tasks, task_datasets
from t5xlike.data.preprocessor_replay import NotDirect, Spec, replay_steps, string_scalar

log = logging.getLogger(__name__)

Example = dict[str, np.ndarray]
VERIFY_EXAMPLES = 40  # Examples compared with TensorFlow by `verify` (over two interleave blocks).
PROGRESS_SECONDS = 10.0  # Between progress lines of the token-length pass.
_READ_BATCH = 1024
_SCAN_BYTES = 64 << 20  # Bytes per step of the newline scan.


# -- interleave order -----------------------------------------------------------
def interleave_order(counts: Sequence[int], cycle_length: int,
                     block_length: int) -> np.ndarray | None:
  """Positions in the concatenation of inputs, in `tf.data.Dataset.interleave` order.

  `counts[k]` elements come from input k; element j of the interleaved
  dataset is element `order[j]` of the inputs concatenated (None: the
  identity). tf.data's deterministic interleave: `cycle_length` slots
  visited in turn, `block_length` elements from each; an exhausted input
  frees its slot (the next input opens there on the slot's next turn).
  """
  counts = [int(c) for c in counts]
  if len(counts) <= 1 or cycle_length == 1 or sum(c > 0 for c in counts) <= 1:
    return None
  offsets = np.concatenate([[0], np.cumsum(counts)])
  starts, lengths = [], []
  slots: list[list[int] | None] = [None] * cycle_length
  next_input, num_open, slot = 0, 0, 0
  while next_input < len(counts) or num_open:
    current = slots[slot]
    if current is not None:
      k, position = current
      take = min(block_length, counts[k] - position)
      if take > 0:
        starts.append(offsets[k] + position)
        lengths.append(take)
        current[1] += take
        if take == block_length:
          slot = (slot + 1) % cycle_length
          continue
      # Exhausted (at once, or within this block): free the slot, next one.
      slots[slot] = None
      num_open -= 1
      slot = (slot + 1) % cycle_length
    elif next_input < len(counts):
      slots[slot] = [next_input, 0]
      next_input += 1
      num_open += 1
    else:
      slot = (slot + 1) % cycle_length
  first, sizes = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
  block_start = np.repeat(np.cumsum(sizes) - sizes, sizes)
  return np.repeat(first, sizes) + np.arange(int(sizes.sum()), dtype=np.int64) - block_start


# -- readers: raw examples of the source, in seqio's order -----------------------
class _Reader(Protocol):
  """Raw source examples by index, in the order seqio's get_dataset(shuffle=False) yields."""
  kind: str  # For logs: 'TFDS array_record', 'text lines'.
  spec: Spec
  tensorflow_reads: bool  # Whether seqio's TensorFlow path can read the split (for verify).
  description: str

  def __len__(self) -> int: ...
  def read(self, indices: Sequence[int]) -> list[Any]: ...


def _tfds_random_access_formats() -> set:
  return set(tfds.core.file_adapters.FileFormat.with_random_access())


class _TfdsReader(_Reader):
  """A prepared TFDS split through `as_data_source`, in tfds.load's interleaved order."""

  def __init__(self, task: seqio.Task, split: str):
    loader = task.source.tfds_dataset
    if library_compat.tfds_decoders(loader):
      raise NotDirect("its TFDS source has decoders")
    read_config = loader.read_config
    if (read_config.experimental_interleave_sort_fn is not None
        or read_config.input_context is not None):
      raise NotDirect("seqio's TFDS read config reorders or shards the files")
    name, _ = loader.get_split_params(split)
    builder = library_compat.tfds_builder(loader, split)  # seqio's, memoized.
    tfds_split = library_compat.tfds_split(loader, split)
    self.tensorflow_reads = task_datasets.tensorflow_reads_tfds(builder)
    try:
      # A read-only builder from the prepared files: it knows the alternative
      # formats (registered builders forget them) and leaves seqio's builder alone.
      files = tfds.builder_from_directory(builder.data_dir)
      formats = files.info.available_file_formats()
    except Exception as error:  # noqa: BLE001  (any failure to open: not direct)
      # tfds and TensorFlow fail in many ways on unprepared, mocked or unreadable datasets.
      raise NotDirect(f"its TFDS dataset {name} cannot be opened from {builder.data_dir}: "
                      f"{type(error).__name__}: {error}") from None
    usable = formats & _tfds_random_access_formats()
    if not usable:
      raise NotDirect(
          f"its TFDS dataset {name} is prepared in {', '.join(sorted(f.value for f in formats))} "
          f"only, without random access; prepare it with `tfds build {name} "
          f"--data_dir={builder.data_dir_root} --file_format=array_record` for direct reads")
    self.source = files.as_data_source(split=tfds_split)
    takes = [int(f.take) for f in files.info.splits[tfds_split].file_instructions]
    if sum(takes) != len(self.source):
      raise NotDirect(f"its TFDS split {tfds_split} holds {len(self.source)} records, its file "
                      f"instructions {sum(takes)}")
    cycle = read_config.interleave_cycle_length
    if cycle == tfds.core.utils.read_config.MISSING:
      cycle = 1 if files.info.disable_shuffling else 16
    block = read_config.interleave_block_length
    if cycle is None:
      raise NotDirect("seqio's TFDS read config has interleave_cycle_length=None (autotuned, "
                      "machine-dependent order)")
    self.order = interleave_order(takes, cycle, block or 1)
    self.spec = _tensor_specs(files.info.features.get_tensor_info())
    self.kind = f"TFDS {files.info.file_format.value}"
    self.description = (f"{name} split {tfds_split} from {builder.data_dir} "
                        f"({files.info.file_format.value}, {len(takes)} shards)")

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices: Sequence[int]) -> list[Any]:
    keys = [int(i) for i in indices] if self.order is None else self.order[list(indices)].tolist()
    # One record at a time: the data source's __getitems__ starts a thread pool per call
    # (~2 ms), worth it on remote storage only.
    return [self.source[k] for k in keys]


def _tensor_specs(info: Any) -> Any:
  """tfds TensorInfo (nested) -> tf.TensorSpec (nested dicts kept)."""
  if isinstance(info, Mapping):
    return {k: _tensor_specs(v) for k, v in info.items()}
  return tf.TensorSpec(info.shape, tf.as_dtype(info.dtype))


class _TextFile:
  """One local text file: memory-mapped, with the end offset of each line."""

  def __init__(self, path: str, skip_lines: int):
    self.path = path
    size = os.path.getsize(path)
    self.data: mmap.mmap | bytes
    if size:  # mmap refuses an empty file.
      with open(path, "rb") as f:
        self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    else:
      self.data = b""
    start, pieces = time.time(), []
    for offset in range(0, size, _SCAN_BYTES):
      view = np.frombuffer(self.data, np.uint8, count=min(_SCAN_BYTES, size - offset),
                           offset=offset)
      pieces.append(np.flatnonzero(view == 10) + offset)
      del view
    ends = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros([0], np.int64)
    tail = int(ends[-1]) + 1 if len(ends) else 0
    if tail < size and self.data[tail:size].replace(b"\r", b""):
      ends = np.concatenate([ends, [size]])  # A last line without '\n' counts when not empty.
    self.ends = ends
    self.skip = min(skip_lines, len(ends))
    if time.time() - start > 5:
      log.info("indexed %s: %d lines, %.1f s", path, len(ends), time.time() - start)

  def __len__(self) -> int:
    return len(self.ends) - self.skip

  def line(self, index: int) -> bytes:
    index += self.skip
    start = int(self.ends[index - 1]) + 1 if index else 0
    return self.data[start:int(self.ends[index])].replace(b"\r", b"")


class _TextLineReader(_Reader):
  """`seqio.TextLineDataSource` over local files, line by line in seqio's order."""

  def __init__(self, task: seqio.Task, split: str):
    source = task.source
    paths = list(source.list_shards(split))
    remote = [p for p in paths if "://" in p]
    if remote:
      raise NotDirect(f"its text files are not local ({remote[0]}); direct reads need local files")
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
      raise NotDirect(f"its text files are missing ({(missing or [source])[0]})")
    skip = library_compat.text_line_header_lines(source)
    self.files = [_TextFile(p, skip) for p in paths]
    counts = [len(f) for f in self.files]
    self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.order = interleave_order(counts, *library_compat.file_interleave(source))
    self.spec = string_scalar()
    self.tensorflow_reads = True
    self.kind = "text lines"
    self.description = f"{len(paths)} text file(s) ({paths[0]}{', ...' if len(paths) > 1 else ''})"

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def read(self, indices: Sequence[int]) -> list[bytes]:
    keys = np.asarray(indices, np.int64)
    if self.order is not None:
      keys = self.order[keys]
    files = np.searchsorted(self.offsets, keys, side="right") - 1
    return [self.files[f].line(int(k - self.offsets[f])) for f, k in zip(files, keys)]


class _HfReader(_Reader):
  """A `hf_sources.HfDatasetSource` split: rows by index, in the order of its tf.data read."""

  def __init__(self, task: seqio.Task, split: str):
    self.source, self.split = task.source, split
    self.spec = self.source.element_spec(split)
    self.tensorflow_reads = True
    self.kind = "Hugging Face datasets"
    self.description = self.source.describe(split)

  def __len__(self) -> int:
    return self.source.num_input_examples(self.split)

  def read(self, indices: Sequence[int]) -> list[Any]:
    return self.source.read(self.split, indices)


def _reader(task: seqio.Task, split: str) -> _Reader:
  source = task.source
  # Exact types: a subclass may override how it reads (get_dataset), which the readers
  # would not replay.
  if type(source) is seqio.TfdsDataSource:
    return _TfdsReader(task, split)
  if type(source) is seqio.TextLineDataSource:
    return _TextLineReader(task, split)
  if type(source) is hf_sources.HfDatasetSource:
    return _HfReader(task, split)
  raise NotDirect(f"its source is a {type(source).__name__} (direct reads: TfdsDataSource "
                  f"prepared as ArrayRecord, TextLineDataSource over local files, "
                  f"hf_sources.HfDatasetSource)")


# -- the source -------------------------------------------------------------------
class DirectSource:
  """A task split read by random access, its deterministic preprocessors replayed outside tf.data.

  Raises NotDirect (a ValueError) when the task does not qualify (see the
  module docstring). `len`, `[i]`, `__getitems__` and `token_lengths` as the
  other random-access sources; examples equal `sources.load_in_memory`'s.
  """

  def __init__(self, task: seqio.Task | str, split: str):
    self.task = seqio_tasks.resolve_task(task)
    self.name, self.split = self.task.name, split
    self.eos_features = tuple(seqio_tasks.check_postcache_preprocessors(self.task))
    self._steps = replay_steps(self.task)  # Cheap checks first: no I/O.
    self._reader = _reader(self.task, split)
    spec = self._reader.spec
    for step in self._steps:
      spec = step.spec(spec)
    if not isinstance(spec, dict):
      raise NotDirect("its examples are not dicts after the preprocessors")
    nested = [k for k in self.task.output_features if isinstance(spec.get(k), dict)]
    if nested:
      raise NotDirect(f"output features {nested} are nested dicts")
    flat = {k: v for k, v in spec.items() if isinstance(v, tf.TensorSpec)}
    self.features = task_datasets.kept_features(self.task, flat)
    self._dtypes = {k: flat[k].dtype.as_numpy_dtype for k, token in self.features.items()
                    if not token}
    self.kind, self.description = self._reader.kind, self._reader.description
    self.tensorflow_reads = self._reader.tensorflow_reads
    self._lengths: dict[str, np.ndarray] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._reader)

  def _examples(self, raws: list[Any]) -> list[Example]:
    for step in self._steps:
      raws = step.apply(raws)
    examples = []
    for raw in raws:
      example = {}
      for key, token in self.features.items():
        value = np.asarray(raw[key], np.int32 if token else self._dtypes[key])
        value.setflags(write=False)
        example[key] = value
      examples.append(example)
    return examples

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    return self._examples(self._reader.read([index % len(self)]))[0]

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    """Examples by index; one read and one tokenizer call for the whole batch."""
    indices = [int(i) for i in indices]
    if any(not 0 <= i < len(self) for i in indices):
      raise IndexError(f"indices out of range for {len(self)} examples")
    return self._examples(self._reader.read(indices)) if indices else []

  def token_lengths(self, feature: str) -> np.ndarray:
    """Length of `feature` in every example: int64 [len(self)]; the first call
    tokenizes the split once (all token features), with progress in the log."""
    if not self.features.get(feature):
      tokens = [k for k, token in self.features.items() if token]
      raise KeyError(f"{self.name}/{self.split}: {feature!r} is not a token feature "
                     f"(token features: {', '.join(tokens) or 'none'})")
    with self._lock:
      if feature not in self._lengths:
        self._lengths.update(self._count_tokens())
    return self._lengths[feature]

  def _count_tokens(self) -> dict[str, np.ndarray]:
    keys = [k for k, token in self.features.items() if token]
    lengths = {k: np.zeros([len(self)], np.int64) for k in keys}
    start = last = time.time()
    log.info("%s/%s: tokenizing %d examples once for their token lengths (%s)", self.name,
             self.split, len(self), self.description)
    for begin in range(0, len(self), _READ_BATCH):
      end = min(begin + _READ_BATCH, len(self))
      for i, example in enumerate(self.__getitems__(range(begin, end)), begin):
        for key in keys:
          lengths[key][i] = len(example[key])
      if time.time() - last > PROGRESS_SECONDS:
        last = time.time()
        log.info("%s/%s: token lengths of %d / %d examples, %.0f examples/s", self.name,
                 self.split, end, len(self), end / (last - start))
    log.info("%s/%s: token lengths of %d examples in %.1f s", self.name, self.split, len(self),
             time.time() - start)
    return lengths

  def verify(self, count: int = VERIFY_EXAMPLES) -> None:
    """NotDirect unless the first `count` examples (and the kept features) equal
    seqio's TensorFlow read of the split; nothing to compare where TensorFlow
    cannot read it (a TFDS dataset prepared as ArrayRecord only)."""
    if not self.tensorflow_reads:
      log.info("%s/%s: TensorFlow cannot read %s; direct reads are the only reads", self.name,
               self.split, self.description)
      return
    dataset, features = task_datasets.deterministic_dataset(self.task, self.split)
    if features != self.features:
      raise NotDirect(f"the replay keeps features {self.features}, TensorFlow {features}")
    cardinality = int(dataset.cardinality())
    if cardinality >= 0 and cardinality != len(self):
      raise NotDirect(f"the replay has {len(self)} examples, TensorFlow {cardinality}")
    iterator = iter(dataset.take(count).as_numpy_iterator())
    try:
      for i, raw in enumerate(iterator):
        expected, got = task_datasets.to_example(raw, features), self[i]
        for key, value in expected.items():
          if value.dtype != got[key].dtype or not np.array_equal(value, got[key]):
            raise NotDirect(f"example {i} differs from TensorFlow's in {key!r}")
    finally:
      del iterator  # Releases the TensorFlow iterator in this thread.

  def __repr__(self) -> str:
    return f"DirectSource({self.name}/{self.split}, {self.kind}, {len(self)} examples)"

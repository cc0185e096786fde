"""Hugging Face `datasets` as seqio data sources: `HfDatasetSource`.

    seqio.TaskRegistry.add("my_qa", source=HfDatasetSource("/data/my_qa"), ...)
    seqio.TaskRegistry.add("my_qa", source=HfDatasetSource(
        data_files={"train": "/data/qa/train-*.parquet", "validation": "/data/qa/dev.parquet"}),
        ...)

A source is either
  a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`,
      opened with `datasets.load_from_disk`: a DatasetDict's splits are the
      task's splits, a single Dataset is the split `split` (default 'train');
  local data files by split (`data_files`: split -> path, glob pattern or a
      list of them), opened with `datasets.load_dataset(file_format,
      data_files=...)`: `file_format` 'parquet', 'json' (JSON lines) or
      'arrow', inferred from the files' extension when not given. `datasets`
      converts such files into Arrow files in its cache once (`cache_dir`,
      default `HF_DATASETS_CACHE`).
The dataset is opened on first use (not when the task is registered);
`datasets` is imported then, and by nothing else in t5xlike.

Examples are rows in TensorFlow's terms, what seqio's preprocessors see:
string columns bytes (tf.string scalars), numeric and ClassLabel columns
NumPy scalars, a list of a string or numeric `Value` a 1-D array, a struct
column a nested dict. Other column types (images, audio, lists of lists or
of structs, timestamps) are left out, with a log line naming them. Example `i`
of a split is row `i` of the dataset in both reads:
  `get_dataset(split, shuffle=False)`: tf.data (seqio's own read, the task
      cache writer `cache_tasks`, the in-memory read of small splits), rows
      in order, through a generator reading 256 rows per step;
  `read(split, indices)`: the same rows by index (random access; the direct
      source `t5xlike.data.direct_sources` replays the preprocessors on them).
The grain pipeline shuffles, resumes and shards by process on top of either.

Errors are `ConfigError`s (one line, exit 2): both or neither of a directory
and data files, a path or pattern that matches nothing, files that
`datasets` cannot read, and (`check_task`) a deterministic preprocessor
that reads a column the dataset lacks or a required output feature missing
after them, naming the task, the preprocessor and the dataset's columns.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from t5xlike.data import seqio_tasks
from t5xlike.errors import ConfigError, one_line

log = logging.getLogger(__name__)

FILE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
READ_BATCH = 256  # Rows per read of the tf.data generator.
Row = dict[str, Any]


# -- columns: datasets features -> TensorSpecs and converters ----------------------
class _Column:
  """One column (or struct field): its TensorSpec (nested dicts for structs) and how a
  Python value of `datasets` becomes TensorFlow's (bytes, NumPy)."""

  def __init__(self, spec: Any, convert: Any):
    self.spec, self.convert = spec, convert


def _import_datasets() -> Any:
  """The `datasets` module, or a ConfigError saying how to install it."""
  try:
    import datasets  # noqa: PLC0415  (only where such a source is used)
  except ImportError:
    raise ConfigError("HfDatasetSource needs Hugging Face datasets: pip install "
                      "'t5xlike[hf_datasets]' (or datasets>=4)") from None
  return datasets


def _text(value: Any) -> bytes:
  if value is None:
    return b""
  return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _value_column(dtype: str, rank: int) -> _Column | None:
  """A `Value(dtype)` (rank 0) or a list of them (rank 1); None for unsupported dtypes."""
  shape = [None] * rank
  if dtype in ("string", "large_string", "binary", "large_binary"):
    if rank == 0:
      return _Column(tf.TensorSpec(shape, tf.string), _text)
    return _Column(tf.TensorSpec(shape, tf.string),
                   lambda v: np.array([_text(s) for s in v], dtype=object))
  try:
    np_dtype = np.dtype(dtype)
    tf_dtype = tf.as_dtype(np_dtype)
  except TypeError:
    return None
  if not (tf_dtype.is_integer or tf_dtype.is_floating or tf_dtype.is_bool):
    return None
  return _Column(tf.TensorSpec(shape, tf_dtype), lambda v: np.asarray(v, np_dtype))


def _column(feature: Any) -> _Column | None:
  """The column of a `datasets` feature; None for types t5xlike does not read."""
  datasets = _import_datasets()
  if isinstance(feature, datasets.Value):
    return _value_column(feature.dtype, 0)
  if isinstance(feature, datasets.ClassLabel):
    return _value_column("int64", 0)
  if isinstance(feature, datasets.List | datasets.LargeList):
    inner = feature.feature
    if isinstance(inner, datasets.ClassLabel):
      return _value_column("int64", 1)
    return _value_column(inner.dtype, 1) if isinstance(inner, datasets.Value) else None
  if isinstance(feature, dict):
    fields = {k: c for k, c in ((k, _column(f)) for k, f in feature.items()) if c is not None}
    if not fields:
      return None
    return _Column({k: c.spec for k, c in fields.items()},
                   lambda v: {k: c.convert(v[k]) for k, c in fields.items()})
  return None


class _Split:
  """One opened split: the `datasets.Dataset` and its readable columns."""

  def __init__(self, dataset: Any, description: str):
    self.dataset, self.description = dataset, description
    self.columns: dict[str, _Column] = {}
    skipped = []
    for name, feature in dataset.features.items():
      column = _column(feature)
      if column is None:
        skipped.append(f"{name} ({type(feature).__name__})")
      else:
        self.columns[name] = column
    if skipped:
      log.info("%s: columns t5xlike does not read, left out: %s", description,
               ", ".join(skipped))
    self.spec = {name: column.spec for name, column in self.columns.items()}
    self._readable = dataset.select_columns(list(self.columns))

  def read(self, indices: Sequence[int]) -> list[Row]:
    if not len(indices):
      return []
    batch = self._readable[[int(i) for i in indices]]  # column -> values
    values = {name: [column.convert(v) for v in batch[name]]
              for name, column in self.columns.items()}
    return [{name: values[name][i] for name in values} for i in range(len(indices))]


# -- the source ---------------------------------------------------------------------
def _file_list(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  if isinstance(files, str | os.PathLike):
    return [os.fspath(files)]
  return [os.fspath(f) for f in files]


def _infer_format(data_files: Mapping[str, list[str]]) -> str:
  suffixes = {os.path.splitext(f)[1].lower() for files in data_files.values() for f in files}
  formats = {FILE_FORMATS.get(s) for s in suffixes}
  if len(formats) != 1 or None in formats:
    raise ConfigError(f"HfDatasetSource: cannot tell the file format from the extensions "
                      f"{', '.join(sorted(suffixes))}: pass file_format= one of "
                      f"{', '.join(sorted(set(FILE_FORMATS.values())))}")
  return formats.pop()  # type: ignore[return-value]


class HfDatasetSource(seqio.DataSource):
  """A Hugging Face `datasets` dataset as a seqio source (see the module docstring).

  Args:
    path: a directory written by `save_to_disk` (a Dataset or a DatasetDict).
    data_files: instead of `path`: split -> local file(s) or glob pattern(s).
    file_format: 'parquet', 'json' or 'arrow' for `data_files` (default: from
      the extension).
    split: the split name of a single saved Dataset (not a DatasetDict).
    cache_dir: where `datasets` keeps the Arrow files it makes of `data_files`
      (None: its default).
    caching_permitted: whether `cache_tasks` may cache the task (seqio's flag).
  """

  def __init__(self, path: str | os.PathLike | None = None, *,
               data_files: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]]
               | None = None, file_format: str | None = None, split: str = "train",
               cache_dir: str | os.PathLike | None = None, caching_permitted: bool = True):
    if (path is None) == (data_files is None):
      raise ConfigError("HfDatasetSource needs either a save_to_disk directory (path) or "
                        "data_files by split, not both")
    self.path = None if path is None else os.fspath(path)
    self.data_files = None if data_files is None else {
        str(s): _file_list(f) for s, f in data_files.items()}
    if self.data_files is not None:
      if not self.data_files or not all(self.data_files.values()):
        raise ConfigError(f"HfDatasetSource: data_files names no file for some split "
                          f"({self.data_files})")
      file_format = file_format or _infer_format(self.data_files)
      if file_format not in FILE_FORMATS.values():
        raise ConfigError(f"HfDatasetSource: file_format={file_format!r}; one of "
                          f"{', '.join(sorted(set(FILE_FORMATS.values())))}")
    self.file_format = file_format
    self.split = split
    self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
    super().__init__(splits=tuple(self.data_files or ()), caching_permitted=caching_permitted)
    self._opened: dict[str, _Split] | None = None
    self._lock = threading.Lock()
    self._checked: set[tuple[str, str]] = set()

  # -- what seqio asks ------------------------------------------------------------
  @property
  def splits(self) -> Sequence[str]:
    if self.data_files is not None:
      return tuple(self.data_files)
    return tuple(self._open())

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def exists(self) -> bool:
    """Whether the splits are known without the data (data files) or its directory exists
    (a machine that trains from the task cache may lack the dataset)."""
    return self.data_files is not None or os.path.exists(str(self.path))

  def num_input_examples(self, split: str) -> int:
    return len(self._split(split).dataset)

  def list_shards(self, split: str) -> Sequence[str]:
    return [f["filename"] for f in self._split(split).dataset.cache_files]

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *,
                  sequence_length: Mapping[str, int] | None = None, use_cached: bool = False,
                  num_epochs: int | None = 1) -> tf.data.Dataset:
    """The rows of `split` as tf.data: in order (shuffle=False; row i is `read(split, [i])`),
    else in a permutation drawn from `seed`; `shard_info`: every num_shards-th row."""
    del sequence_length, use_cached, num_epochs  # (seqio's unused arguments)
    opened = self._split(split)
    order = np.arange(len(opened.dataset), dtype=np.int64)
    if shard_info is not None:
      order = order[shard_info.index::shard_info.num_shards]
    if shuffle:
      order = np.random.default_rng(None if seed is None else int(seed)).permutation(order)

    def rows() -> Iterator[Row]:
      for begin in range(0, len(order), READ_BATCH):
        yield from opened.read(order[begin:begin + READ_BATCH].tolist())
    return tf.data.Dataset.from_generator(rows, output_signature=opened.spec)

  # -- random access ---------------------------------------------------------------
  def read(self, split: str, indices: Sequence[int]) -> list[Row]:
    """Rows `indices` of `split` (one `datasets` read), as `get_dataset` yields them."""
    return self._split(split).read(indices)

  def element_spec(self, split: str) -> dict[str, Any]:
    """{column: tf.TensorSpec (a dict of them for a struct)} of the readable columns."""
    return dict(self._split(split).spec)

  def describe(self, split: str) -> str:
    """The dataset behind `split`, for messages."""
    if self.data_files is None:
      return f"Hugging Face dataset {self.path} split {split}"
    files = self.data_files.get(split, [])
    more = f" and {len(files) - 1} more" if len(files) > 1 else ""
    return f"Hugging Face {self.file_format} files {files[0] if files else '?'}{more}"

  def __repr__(self) -> str:
    where = self.path if self.data_files is None else f"data_files={self.data_files}"
    return f"HfDatasetSource({where})"

  # -- opening -----------------------------------------------------------------------
  def _split(self, split: str) -> _Split:
    opened = self._open()
    if split not in opened:
      raise ValueError(f"{self!r} has no split {split!r} (splits: {', '.join(opened)})")
    return opened[split]

  def _open(self) -> dict[str, _Split]:
    with self._lock:
      if self._opened is None:
        loaded = self._load()
        self._opened = {split: _Split(dataset, self.describe(split))
                        for split, dataset in loaded.items()}
    return self._opened

  def _load(self) -> dict[str, Any]:
    """{split: datasets.Dataset}; ConfigError naming what is missing or unreadable."""
    datasets = _import_datasets()
    if self.data_files is None:
      path = str(self.path)
      if not os.path.exists(path):
        raise ConfigError(f"Hugging Face dataset {path} does not exist")
      try:
        loaded = datasets.load_from_disk(path)
      except FileNotFoundError as error:
        raise ConfigError(f"{path} is not a dataset written by save_to_disk "
                          f"({one_line(error)})") from None
      if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
      return {self.split: loaded}
    for split, files in self.data_files.items():
      for pattern in files:
        if "://" not in pattern and not glob.glob(pattern):
          raise ConfigError(f"data file {pattern} (split {split!r} of a HfDatasetSource) "
                            f"does not exist")
    try:
      loaded = datasets.load_dataset(self.file_format, data_files=self.data_files,
                                     cache_dir=self.cache_dir)
    except datasets.exceptions.DatasetGenerationError as error:
      cause = error.__cause__ or error
      raise ConfigError(f"datasets cannot read the {self.file_format} files "
                        f"{self.data_files}: {one_line(cause)}") from None
    return dict(loaded)

  # -- the task's check ------------------------------------------------------------------
  def check_task(self, task: seqio.Task, split: str) -> None:
    """ConfigError naming the task unless the dataset opens and its columns hold what the
    task's deterministic preprocessors read (traced on tf.data: no row is read).

    Remembered per task and split; a split the dataset lacks is left to the caller.
    """
    if (task.name, split) in self._checked:
      return
    try:
      opened = self._open()
    except ConfigError as error:
      raise ConfigError(f"task {task.name!r}: {error}") from None
    if split not in opened:
      return
    columns = f"{opened[split].description} has columns {', '.join(opened[split].columns)}"
    dataset = self.get_dataset(split, shuffle=False)
    with seqio.utils.map_seed_manager(0):
      for preprocessor in seqio_tasks.split_preprocessors(task)[0]:
        try:
          dataset = seqio.utils.add_kwargs_to_transform(
              preprocessor, sequence_length=None, output_features=task.output_features)(dataset)
        except KeyError as error:
          found = re.findall(r"KeyError: (.*)", str(error))
          key = found[-1].strip() if found else str(error.args[0] if error.args else error)
          raise ConfigError(f"task {task.name!r}: preprocessor "
                            f"{seqio_tasks.preprocessor_name(preprocessor)} reads {key}, which "
                            f"its examples lack ({columns})") from None
    spec = dataset.element_spec
    missing = [k for k, f in task.output_features.items()
               if f.required and not (isinstance(spec, Mapping) and k in spec)]
    if missing:
      raise ConfigError(f"task {task.name!r}: output feature(s) {', '.join(missing)} missing "
                        f"after the preprocessors before seqio.CacheDatasetPlaceholder "
                        f"({columns}; rekey them)")
    self._checked.add((task.name, split))

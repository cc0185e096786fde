"""seqio's TensorFlow read of a task split after its deterministic preprocessors.

`deterministic_dataset(task, split)` is `task.source.get_dataset(split,
shuffle=False)` followed by the deterministic preprocessors
(`seqio_tasks.split_preprocessors`), in file order, with the kept features
(`kept_features`: the numeric output features, name -> is a token feature);
`to_example` turns one of its NumPy elements into t5xlike's example format
(`t5xlike.data.sources`): read-only arrays, token features int32 [length].
Before reading, `check_split` refuses a missing split or an unprepared TFDS
dataset (seqio would download it) and `check_tensorflow_reads` a TFDS dataset
prepared only in a format `tfds.load` cannot read (ArrayRecord; those are
read by `t5xlike.data.direct_sources`).
"""
from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from t5xlike import library_compat
from t5xlike.data import hf_sources, seqio_tasks

Example = dict[str, np.ndarray]
# Seed of the seqio map-seed manager while running the deterministic part, so
# that a pre-cache preprocessor which does take seeds draws the same numbers in
# every run (seqio warns about such preprocessors; a cache holds one draw).
PRECACHE_SEED = 0


# -- checks before reading ---------------------------------------------------------
def check_split(task: seqio.Task, split: str, *, need_data: bool = True) -> None:
  """ValueError unless the task has the split (and, with need_data, its TFDS data is prepared,
  its Hugging Face dataset exists and has the columns its preprocessors read: ConfigError)."""
  if need_data:
    _check_tfds_prepared(task, split)  # An unprepared TFDS dataset knows no splits.
    if isinstance(task.source, hf_sources.HfDatasetSource):
      task.source.check_task(task, split)  # Its path, and the columns its preprocessors read.
  elif (isinstance(task.source, seqio.TfdsDataSource)
        and not library_compat.tfds_splits_named_by_task(task.source)):
    return  # Its splits come from TFDS metadata, which a cache-only machine may lack.
  elif isinstance(task.source, hf_sources.HfDatasetSource) and not task.source.exists():
    return  # A saved dataset's splits are in its directory, which a cache-only machine may lack.
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
    builder = library_compat.tfds_builder(loader, split)
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


def tensorflow_reads_tfds(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether tfds.load (seqio's path) can read a prepared builder's files."""
  file_format = builder.info.file_format
  return file_format is None or file_format in tfds.core.file_adapters.FileFormat.with_tf_data()


def tensorflow_reads(task: seqio.Task, split: str) -> bool:
  """False for a TFDS dataset prepared only in a format tfds.load cannot read (ArrayRecord)."""
  if not isinstance(task.source, seqio.TfdsDataSource):
    return True
  return tensorflow_reads_tfds(library_compat.tfds_builder(task.source.tfds_dataset, split))


def check_tensorflow_reads(task: seqio.Task, split: str) -> None:
  """ValueError, saying how else the split can be read, unless `tensorflow_reads`."""
  if not tensorflow_reads(task, split):
    loader = task.source.tfds_dataset
    name, _ = loader.get_split_params(split)
    builder = library_compat.tfds_builder(loader, split)
    raise ValueError(
        f"task {task.name!r} reads TFDS dataset {name}, prepared as "
        f"{builder.info.file_format.value} only, which TensorFlow (tfds.load) cannot read: "
        f"t5xlike reads such datasets by random access, without tf.data and without a task "
        f"cache, when the task's preprocessors before seqio.CacheDatasetPlaceholder are "
        f"seqio's rekey/tokenize (t5xlike.data.direct_sources); otherwise prepare it as "
        f"tfrecord too (tfds build {name} --data_dir={builder.data_dir_root})")


# -- the dataset and its examples --------------------------------------------------
def _dataset_options() -> tf.data.Options:
  """tf.data without autotuning: its background model thread, competing with
  XLA for the cores, made destroying an iterator take tens of seconds."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return options


def kept_features(task: seqio.Task, spec: Mapping[str, tf.TensorSpec]) -> dict[str, bool]:
  """{feature: is a token feature} for the numeric output features present in `spec`.

  Token features are integer and rank 1 (what a vocabulary produced); string
  features and features outside `task.output_features` are dropped. A
  required output feature missing from `spec` is a ValueError.
  """
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
  check_tensorflow_reads(task, split)
  dataset = task.source.get_dataset(split=split, shuffle=False)
  precache, _ = seqio_tasks.split_preprocessors(task)
  if task.supports_caching:
    dataset = task.preprocess_precache(dataset, seed=PRECACHE_SEED)
  else:
    with seqio.utils.map_seed_manager(PRECACHE_SEED):
      for preprocessor in precache:
        dataset = seqio.utils.add_kwargs_to_transform(
            preprocessor, sequence_length=None, output_features=task.output_features)(dataset)
  return dataset.with_options(_dataset_options()), kept_features(task, dataset.element_spec)


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


def iterate_examples(task: seqio.Task, split: str,
                     start: int = 0) -> Generator[Example, None, None]:
  """Examples of the split from position `start`, in file order (close the generator when done)."""
  dataset, features = deterministic_dataset(task, split)
  iterator = iter(dataset.skip(start).as_numpy_iterator())
  try:
    for raw in iterator:
      yield to_example(raw, features)
  finally:
    del iterator  # Releases the TensorFlow iterator in this thread.

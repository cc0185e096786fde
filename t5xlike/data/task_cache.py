"""The t5xlike task cache: a seqio task split after its deterministic preprocessors.

Layout of `output_dir/<task>/<split>/`:
  data.array_record-<i>-of-<n>  ArrayRecord shards (`group_size:1`, for reads
                                by index); record j of the split is record
                                j - offset of its shard, in file order. Each
                                record is one example, a dict {feature:
                                ndarray} serialized with
                                `flax.serialization.msgpack_serialize` (no
                                pickle): token features int32 [length].
  lengths.<feature>.npy         int64 [num_examples]: the length of each
                                token feature per example.
  stats.json                    written last; without it the directory is not
                                a cache. Fields: format, format_version, task,
                                split, num_examples, features ({name: {dtype,
                                rank, token, tokens (sum of lengths),
                                max_length}}), eos_features,
                                precache_preprocessors (names), precache_seed,
                                seqio_version, shards (file names), seconds,
                                id (of the write that made it).

A cache is written into `.<split>.incomplete-<host>-<pid>-<id>` beside its
final place and renamed into place when complete, so readers never accept
half a cache. An existing cache is replaced in three steps: renamed aside to
`.<split>.old-<host>-<pid>-<id>`, the new one renamed in, the old one
deleted (`_replacement`). Readers (`open_cache`) open the shards eagerly and
re-read stats.json afterwards, so an open cache is one generation, whatever
replaces it later (open files outlive the rename and the deletion); a reader
that meets the split directory missing while an `.old-` sibling says a
replacement is under way, or whose stats.json changed while it opened the
files, waits for the replacement and tries once more.

A writer killed mid-way leaves its `.incomplete-` (or `.old-`) directory
behind; readers ignore it and the next write into the same task directory
removes it (`remove_stale`: its writer, on this host, is no longer running;
one from another host, or without a pid, once untouched for
`STALE_SECONDS`), saying so in the log (`cache_tasks` prints it). Written on
local disks; the reading side goes through `etils.epath`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
from etils import epath
from flax import serialization

from t5xlike import progress as progress_lib
from t5xlike.data import seqio_tasks, task_datasets

FORMAT = "t5xlike.task_cache"
FORMAT_VERSION = 1
STATS = "stats.json"
SHARD_BYTES = 256 << 20  # Target shard size of a cache written without num_shards.
STALE_SECONDS = 24 * 3600  # Age after which a foreign writer's leftovers count as stale.
REPLACE_WAIT_SECONDS = 10.0  # How long a reader waits for a replacement under way.
_POLL_SECONDS = 0.05
_PRIVATE = re.compile(r"^\.(?P<split>.+)\.(?P<kind>incomplete|old)-"
                      r"(?:(?P<host>.+)-(?P<pid>\d+)-)?(?P<id>[0-9a-f]{12})$")

log = logging.getLogger(__name__)


def shard_name(index: int, count: int) -> str:
  return f"data.array_record-{index:05d}-of-{count:05d}"


def lengths_name(feature: str) -> str:
  return f"lengths.{feature}.npy"


def encode(example: Mapping[str, np.ndarray]) -> bytes:
  return serialization.msgpack_serialize({k: np.asarray(v) for k, v in example.items()})


def decode(record: bytes) -> dict[str, np.ndarray]:
  """One example (read-only arrays) from its record."""
  return {k: np.asarray(v) for k, v in serialization.msgpack_restore(record).items()}


# -- reading ------------------------------------------------------------------
def is_cache(directory: str | epath.PathLike) -> bool:
  """Whether `directory` holds a complete cache (its stats.json exists)."""
  return (epath.Path(directory) / STATS).exists()


def read_stats(directory: str | epath.PathLike, text: str | None = None) -> dict[str, Any]:
  """stats.json of a cache (or its `text`, already read), or a ValueError saying why not."""
  if text is None:
    text = _stats_text(epath.Path(directory))
  if text is None:
    raise ValueError(f"{directory} is not a t5xlike task cache (no {STATS}): write it with "
                     f"python -m t5xlike.cache_tasks")
  stats = json.loads(text)
  if stats.get("format") != FORMAT or stats.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{directory} holds a cache of format {stats.get('format')} version "
                     f"{stats.get('format_version')}, this t5xlike reads {FORMAT} version "
                     f"{FORMAT_VERSION}: rewrite it with python -m t5xlike.cache_tasks")
  return stats


def shard_paths(directory: str | epath.PathLike, stats: Mapping[str, Any]) -> list[epath.Path]:
  paths = [epath.Path(directory) / name for name in stats["shards"]]
  missing = [p.name for p in paths if not p.exists()]
  if missing:
    raise ValueError(f"task cache {directory} is damaged: missing {', '.join(missing)}")
  return paths


class ShardReader:
  """Records of ArrayRecord shards by global index, every shard opened at once.

  Open readers keep reading the files they opened even after the cache is
  replaced or deleted (POSIX), so a reader never mixes two generations.
  """

  def __init__(self, paths: Sequence[epath.PathLike]):
    from array_record.python import array_record_module  # noqa: PLC0415  (heavy; cache I/O only)
    self._readers = []
    for path in paths:
      # Reads by index, in any order: readahead would read records nobody asked for.
      reader = array_record_module.ArrayRecordReader(
          os.fspath(path), "readahead_buffer_size:0", file_reader_buffer_size=32768)
      if not reader.ok():
        self.close()
        raise FileNotFoundError(f"cannot open the task cache shard {path}")
      self._readers.append(reader)
    counts = [reader.num_records() for reader in self._readers]
    self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, index: int) -> bytes:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[bytes]:
    keys = np.asarray(indices, np.int64)
    if keys.size and (keys.min() < 0 or keys.max() >= len(self)):
      raise IndexError(f"record index out of range [0, {len(self)})")
    shards = np.searchsorted(self._offsets, keys, side="right") - 1
    out: list[bytes] = [b""] * len(keys)
    for shard in np.unique(shards):
      where = np.flatnonzero(shards == shard)
      records = self._readers[shard].read((keys[where] - self._offsets[shard]).tolist())
      for i, record in zip(where, records):
        out[i] = record
    return out

  def close(self) -> None:
    for reader in self._readers:
      reader.close()
    self._readers = []


@dataclasses.dataclass
class OpenCache:
  """A complete cache, opened: one generation of stats, shards and lengths."""
  directory: epath.Path
  stats: dict[str, Any]
  records: ShardReader
  lengths: dict[str, np.ndarray]  # Every token feature.


class CacheReplaced(ValueError):
  """stats.json changed (or vanished) while a reader opened the cache."""


def _open_once(directory: epath.Path) -> OpenCache:
  text = _stats_text(directory)
  stats = read_stats(directory, text)
  records = ShardReader(shard_paths(directory, stats))
  lengths = {k: read_lengths(directory, stats, k) for k, v in stats["features"].items()
             if v["token"]}
  if _stats_text(directory) != text:  # Replaced while opening: the files may mix generations.
    records.close()
    raise CacheReplaced(f"the task cache {directory} was replaced while it was being opened")
  return OpenCache(directory, stats, records, lengths)


def open_cache(directory: str | epath.PathLike) -> OpenCache:
  """Opens a complete cache; tries once more across a replacement by another writer.

  ValueError (not a cache, damaged, another format) otherwise.
  """
  directory = epath.Path(directory)
  try:
    return _open_once(directory)
  except (ValueError, OSError):
    if not wait_for_replacement(directory):
      raise
  return _open_once(directory)


def _stats_text(directory: epath.Path) -> str | None:
  try:
    return (directory / STATS).read_text()
  except (FileNotFoundError, NotADirectoryError):
    return None


def _replacing(directory: epath.Path) -> bool:
  """Whether a live writer has renamed this cache aside and not yet put the new one in."""
  if not directory.parent.exists():
    return False
  for path in directory.parent.iterdir():
    match = _PRIVATE.match(path.name)
    if (match and match["kind"] == "old" and match["split"] == directory.name
        and _writer_alive(match) is not False):
      return True
  return False


def _sleep(seconds: float) -> None:
  time.sleep(seconds)


def wait_for_replacement(directory: str | epath.PathLike) -> bool:
  """Waits (at most REPLACE_WAIT_SECONDS) while a replacement of this cache is under
  way; whether a complete cache is there afterwards."""
  directory = epath.Path(directory)
  deadline = time.monotonic() + REPLACE_WAIT_SECONDS
  while _replacing(directory) and time.monotonic() < deadline:
    _sleep(_POLL_SECONDS)
  return is_cache(directory)


def read_lengths(directory: str | epath.PathLike, stats: Mapping[str, Any],
                 feature: str) -> np.ndarray:
  """int64 [num_examples]: the lengths of a token feature."""
  info = stats["features"].get(feature)
  if info is None or not info["token"]:
    tokens = [k for k, v in stats["features"].items() if v["token"]]
    raise KeyError(f"{feature!r} is not a token feature of the cache {directory} "
                   f"(token features: {', '.join(tokens) or 'none'})")
  with (epath.Path(directory) / lengths_name(feature)).open("rb") as f:
    return np.load(f)


# -- writing ------------------------------------------------------------------
class _ShardWriter:
  """Writes records into `part-<i>` files, starting a new one past `SHARD_BYTES`."""

  def __init__(self, directory: epath.Path):
    from array_record.python import array_record_module  # noqa: PLC0415  (heavy; cache I/O only)
    self._module = array_record_module
    self.directory = directory
    self.parts: list[epath.Path] = []
    self.counts: list[int] = []  # Records per part.
    self._writer: Any = None  # The open ArrayRecordWriter of the last part.
    self._bytes = 0

  def write(self, record: bytes) -> None:
    writer = self._writer
    if writer is None or self._bytes >= SHARD_BYTES:
      writer = self._roll()
    writer.write(record)
    self._bytes += len(record)
    self.counts[-1] += 1

  def _roll(self) -> Any:
    """Closes the open part and opens the next; returns its writer."""
    if self._writer is not None:
      self._writer.close()
    self.parts.append(self.directory / f"part-{len(self.parts)}")
    self.counts.append(0)
    self._writer = self._module.ArrayRecordWriter(str(self.parts[-1]), "group_size:1")
    self._bytes = 0
    return self._writer

  def close(self) -> None:
    # An empty split still has one (empty) shard.
    writer = self._writer if self._writer is not None else self._roll()
    writer.close()
    self._writer = None


def _reshard(directory: epath.Path, parts: list[epath.Path], total: int,
             num_shards: int) -> list[str]:
  """Rewrites the parts as `num_shards` shards of contiguous ranges; their names."""
  from array_record.python import array_record_module  # noqa: PLC0415  (heavy; cache I/O only)
  records = ShardReader(parts)
  names = [shard_name(i, num_shards) for i in range(num_shards)]
  for i, name in enumerate(names):
    writer = array_record_module.ArrayRecordWriter(str(directory / name), "group_size:1")
    start, stop = i * total // num_shards, (i + 1) * total // num_shards
    for chunk in range(start, stop, 1024):
      for record in records.__getitems__(list(range(chunk, min(chunk + 1024, stop)))):
        writer.write(record)
    writer.close()
  records.close()
  for part in parts:
    part.unlink()
  return names


def _write_examples(directory: epath.Path, examples: Iterable[dict[str, np.ndarray]],
                    features: Mapping[str, bool], label: str, progress: bool,
                    total: int | None = None
                    ) -> tuple[_ShardWriter, dict[str, list[int]], dict[str, Any]]:
  """Writes the records; (writer, token lengths per feature, feature info). `progress`:
  shown as `t5xlike.progress` does (of `total` examples, when known)."""
  writer = _ShardWriter(directory)
  lengths: dict[str, list[int]] = {k: [] for k, token in features.items() if token}
  info: dict[str, Any] = {k: {"dtype": "int32" if token else None, "rank": 1 if token else None,
                              "token": token} for k, token in features.items()}
  with progress_lib.Progress(f"caching {label}", total, enabled=progress) as shown:
    for example in examples:
      writer.write(encode(example))
      for key, value in example.items():
        info[key].update(dtype=value.dtype.name, rank=value.ndim)
      for key, values in lengths.items():
        values.append(len(example[key]))
      shown.update()
  writer.close()
  return writer, lengths, info


def _source_count(task: Any, split: str) -> int | None:
  """The split's example count as the task's source reports it (TFDS: from its metadata;
  preprocessors that filter make the count an upper bound), None when it does not know."""
  try:
    count = task.source.num_input_examples(split)
  except Exception:  # noqa: BLE001  (a source that cannot count: no ETA)
    return None
  return int(count) if count else None


def write_cache(task: Any, split: str, output_dir: str | epath.PathLike, *,
                num_shards: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Writes the cache of one task split into `output_dir/<task>/<split>`; returns its stats.

  Args:
    task: a seqio task or its registered name (not a mixture).
    split: the split to cache.
    output_dir: the cache directory (USE_CACHED_TASKS reads it).
    num_shards: the number of ArrayRecord shards (contiguous ranges of the
      split); None cuts a new shard every `SHARD_BYTES` bytes.
    progress: show the progress (`t5xlike.progress`; of the source's example count
      when it knows it).

  Raises ValueError (before writing anything) for an unknown task or split,
  a refused post-cache preprocessor or an unprepared TFDS dataset.
  """
  if num_shards is not None and num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  task = seqio_tasks.resolve_task(task)
  eos_features = seqio_tasks.check_postcache_preprocessors(task)
  _, features = task_datasets.deterministic_dataset(task, split)  # Validates before writing.
  # A generator: nothing is read before `write_examples` has made its directory.
  stream = task_datasets.iterate_examples(task, split)
  try:
    return write_examples(task.name, split, stream, output_dir, features=features,
                          eos_features=eos_features,
                          precache_preprocessors=seqio_tasks.precache_names(task),
                          num_shards=num_shards, progress=progress,
                          total=_source_count(task, split))
  finally:
    stream.close()


def write_examples(task_name: str, split: str, examples: Iterable[dict[str, np.ndarray]],
                   output_dir: str | epath.PathLike, *, features: Mapping[str, bool],
                   eos_features: Sequence[str], precache_preprocessors: Sequence[str],
                   num_shards: int | None = None, progress: bool = True,
                   total: int | None = None) -> dict[str, Any]:
  """Writes examples as the cache `output_dir/<task_name>/<split>` (atomically, replacing
  an older one); returns its stats. `write_cache` with the examples given.

  Args:
    task_name: the task the cache belongs to (its directory and stats' `task`).
    split: the split (its directory).
    examples: the examples in the `sources` format, in order.
    output_dir: the cache directory (USE_CACHED_TASKS reads it).
    features: {feature: is a token feature} of the examples.
    eos_features: the features that get EOS after trimming (stats' `eos_features`).
    precache_preprocessors: the names of the preprocessors the examples went through
      (stats' `precache_preprocessors`; readers compare them with the task's).
    num_shards: ArrayRecord shards (contiguous ranges); None: one per `SHARD_BYTES`.
    progress: show the progress (`t5xlike.progress`).
    total: the number of examples, when known (the progress's ETA).
  """
  if num_shards is not None and num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  final = epath.Path(output_dir) / task_name / split
  final.parent.mkdir(parents=True, exist_ok=True)
  remove_stale(final.parent)
  cache_id = uuid.uuid4().hex[:12]
  temp = final.parent / _private_name(split, "incomplete", cache_id)
  temp.mkdir()
  start = time.time()
  label = f"{task_name}/{split}"
  try:
    writer, lengths, info = _write_examples(temp, examples, features, label, progress, total)
    total = sum(writer.counts)
    if num_shards is None:
      shards = [shard_name(i, len(writer.parts)) for i in range(len(writer.parts))]
      for part, name in zip(writer.parts, shards):
        part.rename(temp / name)
    else:
      shards = _reshard(temp, writer.parts, total, num_shards)
    for key, values in lengths.items():
      with (temp / lengths_name(key)).open("wb") as f:
        np.save(f, np.asarray(values, np.int64))
      info[key].update(tokens=int(sum(values)), max_length=max(values, default=0))
    stats = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "task": task_name, "split": split,
        "num_examples": total, "features": info, "eos_features": list(eos_features),
        "precache_preprocessors": list(precache_preprocessors),
        "precache_seed": task_datasets.PRECACHE_SEED, "seqio_version": seqio.__version__,
        "shards": shards, "seconds": round(time.time() - start, 3), "id": cache_id,
    }
    (temp / STATS).write_text(json.dumps(stats, indent=2) + "\n")
    _replace(temp, final)
  except BaseException:
    temp.rmtree(missing_ok=True)
    raise
  return stats


def _replace(temp: epath.Path, final: epath.Path) -> None:
  """Moves the complete cache into place, replacing an older one."""
  for _ in _replacement(temp, final):
    pass


def _replacement(temp: epath.Path, final: epath.Path) -> Iterator[str]:
  """The steps of `_replace`, one per `next()` (tests interleave readers between them).

  POSIX cannot rename a directory over a non-empty one, so an existing cache
  is renamed aside first ("aside"), the new one renamed in ("in"), the old
  one deleted ("deleted"); between the first two steps the split directory
  is missing and its `.old-` sibling tells readers to wait (`open_cache`).
  """
  if final.exists():
    old = final.parent / _private_name(final.name, "old", uuid.uuid4().hex[:12])
    final.rename(old)
    yield "aside"
    temp.rename(final)
    yield "in"
    old.rmtree()
    yield "deleted"
  else:
    temp.rename(final)
    yield "in"


# -- writers' leftovers ---------------------------------------------------------
def _private_name(split: str, kind: str, cache_id: str) -> str:
  """`.<split>.<kind>-<host>-<pid>-<id>`: a writer's directory beside the split's."""
  return f".{split}.{kind}-{socket.gethostname()}-{os.getpid()}-{cache_id}"


def _writer_alive(match: re.Match) -> bool | None:
  """Whether the writer named in a private directory runs; None: not known here."""
  if match["pid"] is None or match["host"] != socket.gethostname():
    return None
  try:
    os.kill(int(match["pid"]), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _age_seconds(path: epath.Path) -> float:
  """Seconds since anything in the directory (or the directory) last changed."""
  newest = path.stat().mtime
  for child in path.iterdir():
    try:
      newest = max(newest, child.stat().mtime)
    except FileNotFoundError:
      continue
  return time.time() - newest


def stale_directories(task_dir: str | epath.PathLike) -> list[tuple[epath.Path, str]]:
  """[(directory, why)] of interrupted writers' leftovers in `output_dir/<task>/`:
  `.incomplete-` / `.old-` directories whose writer (on this host) is no longer
  running, or, from another host or an older t5xlike (no pid), untouched for
  STALE_SECONDS."""
  task_dir = epath.Path(task_dir)
  if not task_dir.exists():
    return []
  stale = []
  for path in sorted(task_dir.iterdir()):
    match = _PRIVATE.match(path.name)
    if not match or not path.is_dir():
      continue
    alive = _writer_alive(match)
    if alive is False:
      stale.append((path, f"its writer, pid {match['pid']} on this host, is no longer running"))
    elif alive is None:
      try:
        age = _age_seconds(path)
      except FileNotFoundError:
        continue
      if age > STALE_SECONDS:
        stale.append((path, f"untouched for {age / 3600:.0f} h"))
  return stale


def remove_stale(task_dir: str | epath.PathLike) -> list[epath.Path]:
  """Deletes `stale_directories(task_dir)`, logging each; returns them."""
  removed = []
  for path, why in stale_directories(task_dir):
    log.warning("removing %s, left by an interrupted task cache writer (%s)", path, why)
    path.rmtree(missing_ok=True)
    removed.append(path)
  return removed

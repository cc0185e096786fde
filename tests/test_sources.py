"""Random-access sources of seqio tasks, the task cache and `python -m t5xlike.cache_tasks`."""
import json
import logging
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from t5xlike import cache_tasks
from t5xlike.data import seqio_tasks, sources, task_cache
from t5xlike.tasks import embedded
from tests import user_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encode(text: str) -> np.ndarray:
  return np.asarray(embedded.vocabulary().encode(text), np.int32)


def assert_same_examples(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      assert x[key].dtype == y[key].dtype
      np.testing.assert_array_equal(x[key], y[key])


@pytest.fixture(autouse=True)
def fresh_tfds_builders(monkeypatch):
  """seqio memoizes TFDS builders per process; a mocked one must not outlive its test."""
  monkeypatch.setattr(seqio.utils.LazyTfdsLoader, "_MEMOIZED_BUILDERS", {})


def test_user_tasks_read_after_deterministic_preprocessors():
  qa = sources.load_in_memory("user_function_qa", "train")
  assert (qa.name, qa.split, qa.eos_features) == ("user_function_qa", "train",
                                                  ("inputs", "targets"))
  expected = [{"inputs": encode(q), "targets": encode(a)} for q, a in user_tasks.QA["train"]]
  assert_same_examples([qa[i] for i in range(len(qa))], expected)  # Strings dropped, no EOS.
  np.testing.assert_array_equal(qa.token_lengths("targets"), [len(e["targets"]) for e in expected])
  assert qa.token_lengths("targets").dtype == np.int64
  with pytest.raises(ValueError, match="read-only"):
    qa[0]["targets"][0] = 5  # Read-only: the source's examples cannot be edited in place.
  lines = sources.load_in_memory("user_text_lines", "train")
  rows = [line.split("\t") for line in user_tasks.TSV_PATH.read_text().splitlines()]
  assert_same_examples(lines.__getitems__(range(len(lines))),
                       [{"inputs": encode(q), "targets": encode(a)} for q, a in rows])


def test_cache_round_trip_equals_in_memory(tmp_path):
  stats = task_cache.write_cache("embedded_corpus", "validation", tmp_path, num_shards=3,
                                 progress=False)
  directory = tmp_path / "embedded_corpus" / "validation"
  memory = sources.load_in_memory("embedded_corpus", "validation")
  cached = sources.CachedSource(directory)
  assert len(cached) == len(memory) == 36
  assert_same_examples([cached[i] for i in range(36)], [memory[i] for i in range(36)])
  assert_same_examples(cached.__getitems__([35, 0, 17]), [memory[35], memory[0], memory[17]])
  assert_same_examples([cached[-1]], [memory[35]])
  with pytest.raises(IndexError):
    cached[36]
  lengths = cached.token_lengths("targets")
  assert lengths.dtype == np.int64
  np.testing.assert_array_equal(lengths, [len(memory[i]["targets"]) for i in range(36)])
  on_disk = json.loads((directory / "stats.json").read_text())
  assert on_disk == stats == cached.stats
  assert on_disk["num_examples"] == 36 and on_disk["split"] == "validation"
  assert on_disk["features"] == {"targets": {"dtype": "int32", "rank": 1, "token": True,
                                             "tokens": int(lengths.sum()),
                                             "max_length": int(lengths.max())}}
  assert on_disk["precache_preprocessors"] == ["rekey", "tokenize"]
  assert on_disk["seqio_version"] == seqio.__version__
  assert on_disk["format_version"] == task_cache.FORMAT_VERSION
  assert on_disk["shards"] == [f"data.array_record-{i:05d}-of-00003" for i in range(3)]
  assert sorted(p.name for p in directory.iterdir()) == sorted(
      on_disk["shards"] + ["lengths.targets.npy", "stats.json"])
  with pytest.raises(KeyError, match="not a token feature"):
    cached.token_lengths("inputs")


def test_cache_is_complete_or_absent(tmp_path, monkeypatch):
  task_cache.write_cache("user_function_qa", "train", tmp_path, progress=False)
  directory = tmp_path / "user_function_qa" / "train"
  before = sources.CachedSource(directory)
  assert before.eos_features == ("inputs", "targets")
  original, calls = task_cache.encode, []

  def crash_on_third(example):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError("disk full")
    return original(example)

  monkeypatch.setattr(task_cache, "encode", crash_on_third)
  with pytest.raises(RuntimeError, match="disk full"):
    task_cache.write_cache("user_function_qa", "train", tmp_path, progress=False)
  assert sorted(p.name for p in (tmp_path / "user_function_qa").iterdir()) == ["train"]
  assert_same_examples([sources.CachedSource(directory)[i] for i in range(5)],
                       [before[i] for i in range(5)])  # The old cache is untouched.
  (directory / "stats.json").unlink()  # What a half-written cache would look like.
  assert not task_cache.is_cache(directory)
  with pytest.raises(ValueError, match="not a t5xlike task cache"):
    sources.CachedSource(directory)
  with pytest.raises(ValueError, match="has no cache"):
    sources.open_source("user_function_qa", "train", use_cached=True, cache_dir=str(tmp_path))


def test_open_source_missing_cache_names_the_command(tmp_path):
  with pytest.raises(ValueError) as error:
    sources.open_source("user_function_qa", "validation", use_cached=True, cache_dir=str(tmp_path))
  assert str(error.value) == (
      f"task user_function_qa has no cache in {tmp_path}: run python -m t5xlike.cache_tasks "
      f"--tasks=user_function_qa --output_dir={tmp_path}")


def test_open_source_picks_memory_or_sequential(caplog):
  small = sources.open_source("user_function_qa", "validation", use_cached=False, cache_dir=None)
  assert isinstance(small, sources.InMemorySource) and len(small) == 2
  with caplog.at_level(logging.INFO, logger="t5xlike.data.sources"):
    large = sources.open_source("user_function_qa", "train", use_cached=False, cache_dir=None,
                                in_memory_max_examples=3)
  assert isinstance(large, sources.SequentialSource)
  assert ("reading user_function_qa/train in file order: no global shuffle (cache it with "
          "python -m t5xlike.cache_tasks --tasks=user_function_qa") in caplog.text
  with pytest.raises(sources.SplitTooLargeError, match="cache_tasks"):
    sources.load_in_memory("user_function_qa", "train", max_examples=4)
  with pytest.raises(ValueError, match="unknown task or mixture 'nope'; registered: .*user_"):
    sources.open_source("nope", "train", use_cached=False, cache_dir=None)
  with pytest.raises(ValueError, match="has no split 'test'"):
    sources.open_source("user_text_lines", "test", use_cached=False, cache_dir=None)
  with pytest.raises(ValueError, match="is a mixture"):
    sources.open_source("user_mixture", "train", use_cached=False, cache_dir=None)


def test_sequential_source_resumes_by_position():
  memory = sources.load_in_memory("embedded_corpus", "validation")
  with sources.SequentialSource("embedded_corpus", "validation") as source:
    first = source.iterate(0)
    assert_same_examples([next(first) for _ in range(3)], [memory[i] for i in range(3)])
    resumed = list(source.iterate(30))  # Closes `first`.
    with pytest.raises(StopIteration):
      next(first)
  assert_same_examples(resumed, [memory[i] for i in range(30, 36)])


def test_tfds_task_offline_with_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=4):
    memory = sources.open_source("user_tfds_imdb", "train", use_cached=False, cache_dir=None)
    texts = [ex["text"].decode() for ex in tfds.load(user_tasks.TFDS_NAME, split="train")
             .as_numpy_iterator()]
    task_cache.write_cache("user_tfds_imdb", "validation", tmp_path, progress=False)
  assert isinstance(memory, sources.InMemorySource)
  assert_same_examples([memory[i] for i in range(4)], [{"targets": encode(t)} for t in texts])
  cached = sources.open_source("user_tfds_imdb", "validation", use_cached=True,
                               cache_dir=str(tmp_path))  # No TFDS data needed to read a cache.
  assert_same_examples([cached[i] for i in range(4)], [memory[i] for i in range(4)])


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
  seqio.TaskRegistry.add(
      "test_tfds_unprepared",
      source=seqio.TfdsDataSource(tfds_name=user_tasks.TFDS_NAME, tfds_data_dir=str(tmp_path)),
      preprocessors=[seqio.preprocessors.tokenize],
      output_features={"text": seqio.Feature(embedded.vocabulary())})
  try:
    with pytest.raises(ValueError) as error:
      sources.open_source("test_tfds_unprepared", "train", use_cached=False, cache_dir=None)
  finally:
    seqio.TaskRegistry.remove("test_tfds_unprepared")
  message = str(error.value)
  assert f"is not prepared in {tmp_path}" in message and "\n" not in message
  assert f"tfds build {user_tasks.TFDS_NAME} --data_dir={tmp_path}" in message
  assert "download_and_prepare()" in message


def test_postcache_preprocessors_refused_except_eos():
  with pytest.raises(ValueError) as error:
    sources.open_source("user_random_postcache", "train", use_cached=False, cache_dir=None)
  assert ("t5xlike draws per-example randomness in objectives (train_run.train.objective, e.g. "
          "span_corruption.SpanCorruption / ul2.UL2): remove random_token_drop from task "
          "user_random_postcache and bind the objective instead") in str(error.value)
  with pytest.raises(ValueError, match="post-cache preprocessor drop_empty_targets is not "
                                       "supported: t5xlike runs no TensorFlow per example"):
    seqio_tasks.check_postcache_preprocessors(seqio.get_mixture_or_task("user_postcache_filter"))
  assert seqio_tasks.check_postcache_preprocessors(
      seqio.get_mixture_or_task("embedded_corpus")) == []
  assert seqio_tasks.check_postcache_preprocessors(
      seqio.get_mixture_or_task("user_text_lines")) == ["inputs", "targets"]


@pytest.mark.parametrize("argv, message", [
    (["--tasks=nope"], "error: unknown task or mixture 'nope'; registered:"),
    (["--tasks=user_random_postcache"], "remove random_token_drop from task"),
    (["--tasks=user_text_lines", "--splits=validation"], "has no split 'validation'"),
    (["--tasks=user_text_lines", "--num_shards=x"], "error: argument --num_shards"),
    (["--tasks=embedded_corpus", "--module=tasks.embedded"],
     "error: --module='tasks.embedded' cannot be imported: the shipped task modules are "
     "t5xlike.tasks.*: use 't5xlike.tasks.embedded'"),
])
def test_cache_tasks_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
  assert cache_tasks.main(argv + [f"--output_dir={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1
  assert not (tmp_path / "out").exists()


def test_cache_tasks_entry_point(tmp_path):
  stale = (tmp_path / "user_function_qa" /
           f".train.incomplete-{socket.gethostname()}-{dead_pid()}-0123456789ab")
  stale.mkdir(parents=True)
  result = subprocess.run(
      [sys.executable, "-m", "t5xlike.cache_tasks", "--tasks=user_mixture",
       "--module=tests.user_tasks", f"--output_dir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [line for line in result.stdout.splitlines() if " examples, tokens: " in line]
  assert [line.split(":")[0] for line in lines] == [
      "user_function_qa/train", "user_function_qa/validation", "user_text_lines/train"]
  assert f"removing {stale}, left by an interrupted task cache writer" in result.stdout
  assert not stale.exists()
  assert lines[2].startswith("user_text_lines/train: 7 examples, tokens: inputs ")
  for task, split in [("user_function_qa", "train"), ("user_function_qa", "validation"),
                      ("user_text_lines", "train")]:
    cached = sources.open_source(task, split, use_cached=True, cache_dir=str(tmp_path))
    memory = sources.load_in_memory(task, split)
    assert_same_examples(cached.__getitems__(range(len(cached))),
                         memory.__getitems__(range(len(memory))))


def dead_pid() -> int:
  """The pid of a process that has exited."""
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_stale_writer_directories_are_removed_at_the_next_write(tmp_path, caplog):
  task_dir, host, pid = tmp_path / "user_function_qa", socket.gethostname(), dead_pid()
  names = {"dead": f".train.incomplete-{host}-{pid}-0123456789ab",
           "dead_old": f".train.old-{host}-{pid}-0123456789ac",
           "live": f".train.incomplete-{host}-{os.getpid()}-0123456789ad",
           "foreign_old": ".train.incomplete-other-host-12-0123456789ae",
           "foreign_new": ".validation.incomplete-other-host-13-0123456789af",
           "legacy_old": ".train.incomplete-0123456789b0"}
  two_days_ago = time.time() - 2 * 24 * 3600
  for key, name in names.items():
    (task_dir / name).mkdir(parents=True)
    (task_dir / name / "part-0").write_bytes(b"x")
    if key.endswith("_old") and key != "dead_old":
      for path in (task_dir / name / "part-0", task_dir / name):
        os.utime(path, (two_days_ago, two_days_ago))
  stale = {path.name: why for path, why in task_cache.stale_directories(task_dir)}
  assert sorted(stale) == sorted(names[k] for k in ("dead", "dead_old", "foreign_old",
                                                    "legacy_old"))
  assert stale[names["dead"]] == f"its writer, pid {pid} on this host, is no longer running"
  assert stale[names["legacy_old"]].startswith("untouched for 48 h")
  with caplog.at_level(logging.WARNING, logger="t5xlike.data.task_cache"):
    task_cache.write_cache("user_function_qa", "train", tmp_path, progress=False)
  assert sorted(p.name for p in task_dir.iterdir()) == sorted(
      [names["live"], names["foreign_new"], "train"])
  assert (f"removing {task_dir / names['dead']}, left by an interrupted task cache writer "
          f"(its writer, pid {pid} on this host, is no longer running)") in caplog.text


def second_generation(tmp_path, monkeypatch, num_shards):
  """A cache of user_function_qa/train (1 shard) and a complete newer one (num_shards)
  waiting in its temporary directory: (final, temp, new stats)."""
  task_cache.write_cache("user_function_qa", "train", tmp_path, num_shards=1, progress=False)
  pending = []
  monkeypatch.setattr(task_cache, "_replace", lambda temp, final: pending.append((temp, final)))
  stats = task_cache.write_cache("user_function_qa", "train", tmp_path, num_shards=num_shards,
                                 progress=False)
  monkeypatch.undo()
  (temp, final), = pending
  return final, temp, stats


def test_reader_waits_for_a_replacement_under_way(tmp_path, monkeypatch):
  final, temp, new = second_generation(tmp_path, monkeypatch, num_shards=2)
  steps = task_cache._replacement(temp, final)
  assert next(steps) == "aside" and not final.exists()  # The instant readers could see nothing.
  progress = []
  monkeypatch.setattr(task_cache, "_sleep",  # Each poll of the reader lets the writer go on.
                      lambda seconds: progress.append(next(steps, "done")))
  source = sources.open_source("user_function_qa", "train", use_cached=True,
                               cache_dir=str(tmp_path))
  assert progress == ["in", "deleted"] and source.stats == new
  assert_same_examples(source.__getitems__(range(5)),
                       sources.load_in_memory("user_function_qa", "train").__getitems__(range(5)))


@pytest.mark.parametrize("num_shards", [1, 2], ids=["same_shard_names", "other_shard_names"])
def test_reader_retries_when_the_cache_is_replaced_while_it_opens(tmp_path, monkeypatch,
                                                                  num_shards):
  final, temp, new = second_generation(tmp_path, monkeypatch, num_shards)
  original, calls = task_cache.read_stats, []

  def read_stats_then_replace(directory, text=None):
    stats = original(directory, text)
    if not calls:  # The whole replacement between reading stats.json and opening the shards.
      calls.append(stats["id"])
      task_cache._replace(temp, final)
    return stats

  monkeypatch.setattr(task_cache, "read_stats", read_stats_then_replace)
  monkeypatch.setattr(task_cache, "_sleep", lambda seconds: pytest.fail("no replacement waits"))
  source = sources.CachedSource(final)
  assert calls and calls[0] != new["id"] and source.stats == new
  memory = sources.load_in_memory("user_function_qa", "train")
  assert_same_examples(source.__getitems__(range(5)), memory.__getitems__(range(5)))
  np.testing.assert_array_equal(source.token_lengths("targets"), memory.token_lengths("targets"))


def test_open_cache_outlives_its_replacement(tmp_path):
  task_cache.write_cache("user_function_qa", "train", tmp_path, num_shards=2, progress=False)
  directory = tmp_path / "user_function_qa" / "train"
  before = sources.CachedSource(directory)
  after_stats = task_cache.write_cache("user_function_qa", "train", tmp_path, num_shards=1,
                                       progress=False)
  assert before.stats["id"] != after_stats["id"]  # The old files are deleted, still open here:
  memory = sources.load_in_memory("user_function_qa", "train")
  assert_same_examples(before.__getitems__([4, 0, 3]), memory.__getitems__([4, 0, 3]))
  assert sources.CachedSource(directory).stats == after_stats

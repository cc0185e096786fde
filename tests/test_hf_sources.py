"""Hugging Face `datasets` as seqio sources (`t5xlike.data.hf_sources`): a dataset saved in
the test (save_to_disk, parquet, JSON lines, arrow) read through tf.data and by index, against
the files read directly; the pipeline's resume and process shards, the task cache, errors,
and a training run killed with kill -9 that resumes bitwise."""
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
import tensorflow as tf

from t5xlike import cache_tasks, errors, train
from t5xlike.data import direct_sources, hf_sources, pipeline, sources
from t5xlike.tasks import embedded
from tests import hf_tasks

REPO = pathlib.Path(__file__).resolve().parents[1]
KINDS = ("saved", "parquet", "json", "arrow")
LENGTHS = {"inputs": 32, "targets": 12}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """{kind: (task name, files read directly in order)}; tasks removed at the end."""
  root = tmp_path_factory.mktemp("hf")
  files = hf_tasks.write_dataset(root)
  cache = root / "hf_cache"
  registered = {"saved": ("hf_saved", sorted((root / "saved" / "train").glob("data-*.arrow")))}
  hf_tasks.register("hf_saved", hf_sources.HfDatasetSource(root / "saved"))
  for kind in ("parquet", "json", "arrow"):
    hf_tasks.register(f"hf_{kind}", hf_sources.HfDatasetSource(
        data_files={"train": files[kind]}, cache_dir=cache))
    registered[kind] = (f"hf_{kind}", files[kind])
  hf_tasks.register("hf_missing", hf_sources.HfDatasetSource(root / "no_such_dataset"))
  hf_tasks.register("hf_wrong_columns", hf_sources.HfDatasetSource(root / "saved"),
                    key_map={"inputs": "query", "targets": "answer"})
  yield {"root": root, **registered}
  for name in ("hf_saved", "hf_parquet", "hf_json", "hf_arrow", "hf_missing",
               "hf_wrong_columns"):
    seqio.TaskRegistry.remove(name)


def read_files(kind, paths):
  """The rows of the files, read without `datasets`."""
  out = []
  for path in paths:
    if kind == "parquet":
      out += pq.read_table(path).to_pylist()
    elif kind == "json":
      out += [json.loads(line) for line in path.read_text().splitlines()]
    else:  # arrow: what save_to_disk writes (Arrow IPC streams)
      with pa.memory_map(str(path)) as f:
        out += pa.ipc.open_stream(f).read_all().to_pylist()
  return out


def as_tensorflow(value):
  """A file's value as TensorFlow gives it (strings bytes, lists arrays)."""
  if isinstance(value, dict):
    return {k: as_tensorflow(v) for k, v in value.items()}
  if isinstance(value, str):
    return value.encode()
  return np.asarray(value)


def assert_same_rows(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      if isinstance(x[key], dict):
        assert_same_rows([x[key]], [y[key]])
      else:
        np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]))


def assert_same_examples(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    assert all(x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes() for k in x)


def everything(source):
  return [source[i] for i in range(len(source))]


def tensorflow_rows(dataset):
  return [{k: v for k, v in row.items()} for row in dataset.as_numpy_iterator()]


@pytest.mark.parametrize("kind", KINDS)
def test_rows_and_examples_equal_the_files_read_directly(data, kind):
  name, paths = data[kind]
  source = seqio.get_mixture_or_task(name).source
  expected = [as_tensorflow(row) for row in read_files(kind, paths)]
  assert len(expected) == hf_tasks.SIZES["train"] == source.num_input_examples("train")
  assert_same_rows(source.read("train", range(len(expected))), expected)
  assert_same_rows(tensorflow_rows(source.get_dataset("train", shuffle=False)), expected)
  # Examples: seqio's tokenize is the vocabulary's encode_tf of each text.
  vocabulary = embedded.vocabulary()
  encode = lambda text: vocabulary.encode_tf(tf.constant(text)).numpy().astype(np.int32)
  tokens = [{"inputs": encode(r["question"]), "targets": encode(r["answer"])} for r in expected]
  direct = direct_sources.DirectSource(name, "train")
  assert_same_examples(everything(direct), tokens)
  assert_same_examples(everything(sources.load_in_memory(name, "train")), tokens)  # tf.data


def test_random_access_is_the_tensorflow_order(data, caplog):
  name = data["saved"][0]
  with caplog.at_level(logging.INFO, logger="t5xlike.data"):
    direct = sources.open_source(name, "train", use_cached=False, cache_dir=None,
                                 in_memory_max_examples=0)  # verify(): first 40 vs TensorFlow
  assert isinstance(direct, direct_sources.DirectSource), caplog.text
  assert f"reading {name}/train directly: 57 examples by random access" in caplog.text
  memory = sources.load_in_memory(name, "train")  # seqio's TensorFlow read, in order
  assert isinstance(memory, sources.InMemorySource)
  assert_same_examples(everything(direct), everything(memory))
  order = np.random.default_rng(0).permutation(len(direct))
  assert_same_examples(direct.__getitems__(order), [memory[i] for i in order])
  for feature in ("inputs", "targets"):
    np.testing.assert_array_equal(direct.token_lengths(feature), memory.token_lengths(feature))
  validation = sources.open_source(name, "validation", use_cached=False, cache_dir=None)
  assert len(validation) == hf_tasks.SIZES["validation"]
  # seqio's own arguments: a shard is every num_shards-th row, shuffle a seeded permutation.
  source = seqio.get_mixture_or_task(name).source
  rows = source.read("train", range(57))
  shard = tensorflow_rows(source.get_dataset("train", shuffle=False,
                                             shard_info=seqio.ShardInfo(1, 3)))
  assert_same_rows(shard, rows[1::3])
  shuffled = [tensorflow_rows(source.get_dataset("train", shuffle=True, seed=s)) for s in (5, 5, 6)]
  assert_same_rows(shuffled[0], shuffled[1])
  assert [r["question"] for r in shuffled[0]] != [r["question"] for r in shuffled[2]]
  assert sorted(r["question"] for r in shuffled[0]) == sorted(r["question"] for r in rows)


def test_pipeline_resumes_by_position_and_shards_by_process(data):
  name = data["parquet"][0]

  def make(**kwargs):
    return pipeline.Pipeline(name, "train", LENGTHS, 4, None, seed=3, num_threads=0,
                             in_memory_max_examples=0, **kwargs)

  def take(feed, n):
    return [next(feed) for _ in range(n)]

  whole = make()
  assert isinstance(whole.sources[0], direct_sources.DirectSource)
  expected = take(whole, 20)  # over one epoch of 57 examples: a second, reshuffled one
  feed = make()
  take(feed, 8)
  resumed = make()
  resumed.set_state(feed.get_state())
  for a, b in zip(expected[8:], take(resumed, 12)):
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
  rows = lambda batch: {row.tobytes() for row in batch["encoder_input_tokens"]}
  parts = [take(make(process_index=p, process_count=2), 3) for p in range(2)]
  for k in range(3):
    a, b = rows(parts[0][k]), rows(parts[1][k])
    assert not a & b and a | b == rows(expected[k])


def test_cache_tasks_writes_the_same_examples(data, tmp_path):
  name = data["json"][0]
  assert cache_tasks.main([f"--tasks={name}", f"--output_dir={tmp_path}"]) == 0
  cached = sources.open_source(name, "train", use_cached=True, cache_dir=str(tmp_path))
  assert isinstance(cached, sources.CachedSource)
  assert_same_examples(everything(cached), everything(direct_sources.DirectSource(name, "train")))


def test_a_saved_dataset_without_splits_is_the_split_named(data, tmp_path):
  import datasets
  datasets.Dataset.from_dict(hf_tasks.rows("validation")).save_to_disk(str(tmp_path / "one"))
  source = hf_sources.HfDatasetSource(tmp_path / "one", split="dev")
  assert tuple(source.splits) == ("dev",)
  expected = [as_tensorflow(r) for r in
              read_files("arrow", sorted((tmp_path / "one").glob("data-*.arrow")))]
  assert_same_rows(source.read("dev", range(hf_tasks.SIZES["validation"])), expected)


def test_bad_sources_are_config_errors(data):
  with pytest.raises(errors.ConfigError, match="either a save_to_disk directory"):
    hf_sources.HfDatasetSource()
  with pytest.raises(errors.ConfigError, match=r"extensions \.csv, \.parquet"):
    hf_sources.HfDatasetSource(data_files={"train": ["a.parquet", "b.csv"]})
  missing = hf_sources.HfDatasetSource(data_files={"train": str(data["root"] / "nothing-*.jsonl")})
  with pytest.raises(errors.ConfigError, match=r"data file .*nothing-\*\.jsonl \(split 'train'"):
    missing.num_input_examples("train")
  broken = data["root"] / "broken.jsonl"
  broken.write_text('{"question": "a", "answer": "b"}\nnot json\n')
  unreadable = hf_sources.HfDatasetSource(data_files={"train": broken},
                                          cache_dir=data["root"] / "broken_cache")
  with pytest.raises(errors.ConfigError, match="datasets cannot read the json files"):
    unreadable.num_input_examples("train")
  not_saved = hf_sources.HfDatasetSource(data["root"])  # a directory, not a saved dataset
  with pytest.raises(errors.ConfigError, match="is not a dataset written by save_to_disk"):
    list(not_saved.splits)


CULPRITS = {"hf_missing": ("task 'hf_missing'", "no_such_dataset does not exist"),
            "hf_wrong_columns": ("task 'hf_wrong_columns'", "preprocessor rekey reads 'query'",
                                 "has columns question, answer, label, ids, meta")}


@pytest.mark.parametrize("task", sorted(CULPRITS))
def test_cache_tasks_of_a_missing_dataset_or_column_is_one_line_exit_2(data, tmp_path, capsys,
                                                                        task):
  assert cache_tasks.main([f"--tasks={task}", f"--output_dir={tmp_path}"]) == 2
  line = capsys.readouterr().err.strip().splitlines()[-1]
  assert line.startswith("error: ") and all(c in line for c in CULPRITS[task]), line
  assert list(tmp_path.iterdir()) == []


def test_training_on_a_missing_dataset_is_one_line_exit_2(data, tmp_path, capsys):
  """(Both errors above are raised where every read of a split starts,
  `task_datasets.check_split`; one training run shows the path to exit 2.)"""
  assert train.main(["--gin_file=gin_configs/quickstart.gin", "--gin.BATCH_SIZE=4",
                     "--gin.MIXTURE_OR_TASK_NAME='hf_missing'", "--gin.EVAL_PERIOD=None",
                     "--gin.train_run.train.objective=None",
                     f"--gin.MODEL_DIR={tmp_path / 'run'}"]) == 2
  line = capsys.readouterr().err.strip().splitlines()[-1]
  assert line.startswith("error: ") and all(c in line for c in CULPRITS["hf_missing"]), line
  assert not (tmp_path / "run").exists()


def test_datasets_is_imported_only_where_such_a_source_is_used():
  """Importing the data modules and registering a task over a dataset imports no `datasets`."""
  code = ("import sys\nimport t5xlike.data.sources\n"
          "from t5xlike.data import hf_sources\nfrom tests import hf_tasks\n"
          "hf_tasks.register('hf_lazy', hf_sources.HfDatasetSource('/no/such/dataset'))\n"
          "sys.exit('datasets' in sys.modules)\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]


# -- training: kill -9, then the same command resumes bitwise ----------------------------
SMALL = ["--gin_file=gin_configs/quickstart.gin", "--gin.MIXTURE_OR_TASK_MODULE=tests.hf_tasks",
         "--gin.MIXTURE_OR_TASK_NAME='hf_qa'", "--gin.train_run.train.objective=None",
         "--gin.BATCH_SIZE=4", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 12}",
         "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=None", "--gin.CHECKPOINT_PERIOD=3",
         "--gin.TRAIN_STEPS=6", "--gin.CheckpointConfig.async_save=False"]


def losses(model_dir):
  """(step, loss) of the complete rows of metrics/train.jsonl (kill -9 may tear the last)."""
  path = pathlib.Path(model_dir) / "metrics" / "train.jsonl"
  lines = path.read_text().split("\n")[:-1] if path.exists() else []
  return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def saved_params(step_dir):
  """{path: NumPy array} of a checkpoint's parameters."""
  import jax
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as checkpointer:
    params = checkpointer.restore(step_dir / "state")["params"]
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.slow  # ~1-2 min: three training runs, one a subprocess (resume by position: above)
@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # (orbax, saved_params)
def test_kill_9_then_the_same_command_resumes_bitwise(data, tmp_path):
  """The task over a dataset saved in the test: an uninterrupted 6-step run; a
  `python -m t5xlike.train` killed with SIGKILL once step 4 is logged, then the same
  command: the same losses and final parameters, bit for bit."""
  saved = data["root"] / "saved"
  hf_tasks.register("hf_qa", hf_sources.HfDatasetSource(saved))  # (this process's runs)
  baseline = tmp_path / "whole"
  assert train.main(SMALL + [f"--gin.MODEL_DIR={baseline}"]) == 0
  killed = tmp_path / "killed"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **{hf_tasks.ENV: str(saved)})
  # TRAIN_STEPS does not enter the schedule: still training when the signal arrives.
  process = subprocess.Popen(
      [sys.executable, "-m", "t5xlike.train", *SMALL, f"--gin.MODEL_DIR={killed}",
       "--gin.TRAIN_STEPS=100000"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while len(losses(killed)) < 4 and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.kill()
  _, err = process.communicate()
  assert len(losses(killed)) >= 4 and process.returncode == -signal.SIGKILL, err[-3000:]
  steps = [int(p.name.split("_")[1]) for p in killed.glob("checkpoint_*")]
  assert max(steps) in (3, 6)  # (6 only when the save of step 6 outran the kill)
  assert train.main(SMALL + [f"--gin.MODEL_DIR={killed}"]) == 0
  assert losses(killed) == losses(baseline)  # JSON floats round-trip exactly
  a, b = (saved_params(d / "checkpoint_6") for d in (baseline, killed))
  assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
  seqio.TaskRegistry.remove("hf_qa")

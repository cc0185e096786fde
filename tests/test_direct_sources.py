"""Direct sources: TFDS ArrayRecord datasets and text lines read by index, seqio's
deterministic preprocessors replayed in Python, checked against seqio's TensorFlow path."""
import functools
import json
import logging
import pathlib

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from t5xlike import cache_tasks, train
from t5xlike.data import direct_sources, pipeline, preprocessor_replay, sources, task_datasets
from t5xlike.objectives import span_corruption
from t5xlike.tasks import embedded
from tests import user_tasks

# Python sentencepiece and tf_text's op segment this tie differently ('___').
TIE = "if __name___ == '__main__': run()"
WORDS = ("the quick brown fox jumps over a lazy dog while seven tiny robots sing about "
         "rivers, mountains and café ünïcode text").split()


def sentence(i: int) -> str:
  rng = np.random.default_rng(i)
  return " ".join(rng.choice(WORDS, size=int(rng.integers(0, 30))))


class T5xlikeDirectToy(tfds.core.GeneratorBasedBuilder):
  """A few dozen question/answer texts (registered as 't5xlike_direct_toy')."""
  VERSION = tfds.core.Version("1.0.0")
  url_infos = None  # No downloads (tfds would look for a checksums file beside this module).

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "question": tfds.features.Text(), "answer": tfds.features.Text(), "label": np.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 57), "test": self._generate_examples(100, 12)}

  def _generate_examples(self, start, count):
    for i in range(start, start + count):
      answer = TIE if i == start + 3 else sentence(2 * i + 1)
      yield i, {"question": f"question {i}: {sentence(2 * i)}?", "answer": answer, "label": i % 3}


def prepare(data_dir: pathlib.Path, file_format: str) -> tfds.core.DatasetBuilder:
  """The toy dataset prepared in 3 shards per split ('both': TFRecord + ArrayRecord)."""
  builder = T5xlikeDirectToy(data_dir=str(data_dir),
                             file_format="tfrecord" if file_format == "both" else file_format)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
  if file_format == "both":  # What `tfds convert_format` (apache-beam) does: same records.
    from array_record.python import array_record_module
    for path in sorted(pathlib.Path(builder.data_dir).glob("*.tfrecord-*")):
      writer = array_record_module.ArrayRecordWriter(
          str(path).replace(".tfrecord-", ".array_record-"), "group_size:1")
      for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        writer.write(record)
      writer.close()
    builder.info.add_alternative_file_format("array_record")
    builder.info.write_to_directory(builder.data_dir)
  return builder


def write_lines(directory: pathlib.Path) -> str:
  """Two text files (a header line each, CRLF, stray CRs, empty lines, no final newline)."""
  directory.mkdir()
  a = ["# header a"] + [sentence(300 + i) for i in range(40)]
  a[5], a[9], a[12] = "", "carriage\rreturn inside", TIE
  (directory / "lines-0.txt").write_bytes("\r\n".join(a).encode() + b"\r\n")
  b = ["# header b"] + [sentence(400 + i) for i in range(25)]
  (directory / "lines-1.txt").write_bytes("\n".join(b).encode())
  return str(directory / "lines-*.txt")


def features(inputs_required=True):
  return {k: seqio.Feature(embedded.vocabulary(), add_eos=True, dtype=tf.int32,
                           required=k == "targets" or inputs_required)
          for k in ("inputs", "targets")}


QA_PREPROCESSORS = [
    functools.partial(seqio.preprocessors.rekey,
                      key_map={"inputs": "question", "targets": "answer", "unused": None}),
    seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
    seqio.preprocessors.append_eos_after_trim]
TFDS_SPLITS = {"train": "train", "validation": "test", "middle": "train[7:52]"}
TASKS = ("direct_tfds", "direct_tfds_ar", "direct_tfds_tfrecord", "direct_lines", "direct_tsv")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
  root = tmp_path_factory.mktemp("direct")
  for kind, file_format in [("both", "both"), ("ar", "array_record"), ("tfrecord", "tfrecord")]:
    prepare(root / kind, file_format)
  for name, kind in [("direct_tfds", "both"), ("direct_tfds_ar", "ar"),
                     ("direct_tfds_tfrecord", "tfrecord")]:
    seqio.TaskRegistry.add(
        name, source=seqio.TfdsDataSource(tfds_name="t5xlike_direct_toy:1.0.0",
                                          tfds_data_dir=str(root / kind), splits=TFDS_SPLITS),
        preprocessors=QA_PREPROCESSORS, output_features=features(), metric_fns=[])
  seqio.TaskRegistry.add(
      "direct_lines",
      source=seqio.TextLineDataSource({"train": write_lines(root / "lines")}, skip_header_lines=1),
      preprocessors=[functools.partial(preprocessor_replay.parse_lines, key="targets"),
                     seqio.preprocessors.tokenize_and_append_eos, seqio.CacheDatasetPlaceholder()],
      output_features=features(inputs_required=False), metric_fns=[])
  seqio.TaskRegistry.add(
      "direct_tsv", source=seqio.TextLineDataSource({"train": str(user_tasks.TSV_PATH)}),
      preprocessors=[functools.partial(preprocessor_replay.parse_tsv,
                                       field_names=["inputs", "targets"]),
                     functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
                     seqio.CacheDatasetPlaceholder(), seqio.preprocessors.append_eos],
      output_features=features(), metric_fns=[])
  seqio.MixtureRegistry.add("direct_mixture", [("direct_tfds", 1.0), ("direct_lines", 1.0)])
  yield root
  seqio.MixtureRegistry.remove("direct_mixture")
  for name in TASKS:
    seqio.TaskRegistry.remove(name)


def assert_same_examples(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape
      np.testing.assert_array_equal(x[key], y[key])


def everything(source):
  return [source[i] for i in range(len(source))]


def open_direct(name, split, caplog):
  with caplog.at_level(logging.INFO, logger="t5xlike.data"):
    source = sources.open_source(name, split, use_cached=False, cache_dir=None,
                                 in_memory_max_examples=0)
  assert isinstance(source, direct_sources.DirectSource), caplog.text
  assert f"reading {name}/{split} directly: {len(source)} examples by random access" in caplog.text
  return source


def test_interleave_order_is_tf_data_interleave():
  rng = np.random.default_rng(0)
  for _ in range(12):
    counts = [int(c) for c in rng.choice([0, 1, 5, 16, 17, 33], size=int(rng.integers(1, 20)))]
    cycle, block = int(rng.choice([1, 2, 16])), int(rng.choice([1, 3, 16]))
    inputs = tf.data.Dataset.from_tensor_slices(np.asarray(counts, np.int64))
    ranges = inputs.enumerate().interleave(
        lambda k, n: tf.data.Dataset.range(n).map(lambda j: (k, j)), cycle_length=cycle,
        block_length=block, num_parallel_calls=tf.data.AUTOTUNE)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    expected = [int(offsets[k] + j) for k, j in ranges.as_numpy_iterator()]
    order = direct_sources.interleave_order(counts, cycle, block)
    assert (list(range(sum(counts))) if order is None else order.tolist()) == expected


def test_tokens_are_those_of_seqio_tensorflow_op():
  vocabulary = embedded.vocabulary()
  expected = vocabulary.encode_tf(tf.constant(TIE)).numpy().tolist()
  assert vocabulary.encode(TIE) != expected  # Why the replay runs tf_text's op, not sentencepiece.
  encode = preprocessor_replay._encoder(vocabulary)
  assert [ids.tolist() for ids in encode([TIE.encode(), b""])] == [expected, []]
  assert preprocessor_replay._encoder(
      seqio.PassThroughVocabulary(8)) is None


@pytest.mark.parametrize("split", ["train", "validation", "middle"])
def test_tfds_direct_source_equals_seqio_tensorflow(registered, caplog, split):
  direct = open_direct("direct_tfds", split, caplog)
  assert "t5xlike_direct_toy" in direct.description and "array_record" in direct.description
  memory = sources.load_in_memory("direct_tfds", split)  # seqio's TensorFlow path (TFRecord).
  assert len(direct) == len(memory) == {"train": 57, "validation": 12, "middle": 45}[split]
  assert direct.eos_features == memory.eos_features == ("inputs", "targets")
  assert_same_examples(everything(direct), everything(memory))
  order = np.random.default_rng(1).permutation(len(direct))
  assert_same_examples(direct.__getitems__(order), [memory[i] for i in order])
  assert_same_examples([direct[i] for i in reversed(range(len(direct)))],
                       [memory[i] for i in reversed(range(len(memory)))])
  assert_same_examples([direct[-1]], [memory[len(memory) - 1]])
  with pytest.raises(IndexError):
    direct[len(direct)]
  for feature in ("inputs", "targets"):
    np.testing.assert_array_equal(direct.token_lengths(feature), memory.token_lengths(feature))
    assert direct.token_lengths(feature).dtype == np.int64
  with pytest.raises(KeyError, match="not a token feature"):
    direct.token_lengths("label")
  with pytest.raises(ValueError, match="read-only"):
    direct[0]["targets"][0] = 1  # Read-only, like the other sources.


def test_text_lines_direct_source_equals_seqio_tensorflow(registered, caplog):
  direct = open_direct("direct_lines", "train", caplog)
  memory = sources.load_in_memory("direct_lines", "train")
  assert len(direct) == len(memory) == 65 and direct.eos_features == ()
  assert_same_examples(everything(direct), everything(memory))
  order = np.random.default_rng(2).permutation(len(direct))
  assert_same_examples(direct.__getitems__(order), [memory[i] for i in order])
  np.testing.assert_array_equal(direct.token_lengths("targets"), memory.token_lengths("targets"))
  eos = embedded.vocabulary().eos_id
  assert all(e["targets"][-1] == eos for e in everything(direct))  # tokenize_and_append_eos.
  tsv = open_direct("direct_tsv", "train", caplog)  # parse_tsv = tests/user_tasks.py's parser.
  assert_same_examples(everything(tsv), everything(sources.load_in_memory("user_text_lines",
                                                                          "train")))


def test_array_record_only_dataset_is_read_directly(registered, caplog, tmp_path):
  reference = everything(sources.load_in_memory("direct_tfds", "train"))
  small = sources.open_source("direct_tfds_ar", "train", use_cached=False, cache_dir=None)
  assert isinstance(small, sources.InMemorySource)  # Held in memory, read without TensorFlow.
  assert_same_examples(everything(small), reference)
  direct = open_direct("direct_tfds_ar", "train", caplog)
  assert "TensorFlow cannot read" in caplog.text
  assert_same_examples(everything(direct), reference)
  with pytest.raises(ValueError, match="prepared as array_record only, which TensorFlow"):
    task_datasets.deterministic_dataset(seqio.get_mixture_or_task("direct_tfds_ar"), "train")
  assert cache_tasks.main(["--tasks=direct_tfds_ar", f"--output_dir={tmp_path}"]) == 2


def test_tfrecord_only_dataset_keeps_the_tensorflow_path(registered, caplog):
  with caplog.at_level(logging.INFO, logger="t5xlike.data"):
    source = sources.open_source("direct_tfds_tfrecord", "train", use_cached=False,
                                 cache_dir=None, in_memory_max_examples=0)
  assert isinstance(source, sources.SequentialSource)
  source.close()
  assert ("reading direct_tfds_tfrecord/train in file order: no global shuffle" in caplog.text
          and "not read directly: its TFDS dataset t5xlike_direct_toy:1.0.0 is prepared in "
              "tfrecord only" in caplog.text
          and "--file_format=array_record" in caplog.text)


def test_tasks_that_do_not_qualify_say_why():
  def why(name):
    with pytest.raises(preprocessor_replay.NotDirect) as error:
      direct_sources.DirectSource(name, "train")
    return str(error.value)
  assert "its source is a FunctionDataSource" in why("user_function_qa")
  assert "preprocessor parse_tsv cannot be replayed outside tf.data" in why("user_text_lines")


@pytest.mark.parametrize("objective", [None, span_corruption.SpanCorruption()],
                         ids=["supervised", "span_corruption"])
def test_pipeline_batches_are_the_same_from_memory_or_direct(registered, objective):
  lengths = {"inputs": 32, "targets": 12}

  def batches(name, **kwargs):
    feed = pipeline.Pipeline(name, "train", lengths, 4, objective, seed=3, num_threads=0,
                             **kwargs)
    return [next(feed) for _ in range(6)]

  names = ["direct_tfds"] + (["direct_lines"] if objective is not None else [])
  for name in names:
    memory = batches(name)
    direct = batches(name, in_memory_max_examples=0)
    opened = pipeline._SOURCES
    assert isinstance(next(v for k, v in opened.items() if k[1] == name and k[-1] == 0),
                      direct_sources.DirectSource)
    for a, b in zip(memory, direct):
      assert a.keys() == b.keys()
      assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def test_training_runs_on_direct_sources(registered, tmp_path, monkeypatch, caplog):
  open_source = sources.open_source
  monkeypatch.setattr(sources, "open_source",  # Force the direct path for these small tasks.
                      lambda *a, **k: open_source(*a, **{**k, "in_memory_max_examples": 0}))
  monkeypatch.setattr(pipeline, "_SOURCES", {})
  with caplog.at_level(logging.INFO, logger="t5xlike.data"):
    assert train.main(["--gin_file=gin_configs/quickstart.gin",
                       "--gin.MIXTURE_OR_TASK_NAME='direct_mixture'", "--gin.BATCH_SIZE=4",
                       "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
                       "--gin.TRAIN_STEPS=6", "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=None",
                       f"--gin.MODEL_DIR={tmp_path}"]) == 0
  assert "reading direct_tfds/train directly" in caplog.text
  assert "reading direct_lines/train directly" in caplog.text
  rows = [json.loads(line) for line in (tmp_path / "metrics" / "train.jsonl").read_text()
          .splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]  # it learns
  data = json.loads((tmp_path / "checkpoint_6" / "data" / "metadata").read_text())
  assert data["batches"] == 6

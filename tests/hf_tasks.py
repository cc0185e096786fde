"""Hugging Face `datasets` task fixtures (tests/test_hf_sources.py).

`write_dataset(directory)` saves a small question/answer DatasetDict
(`save_to_disk`: train 57 rows in 2 shards, validation 9) and the same rows as
parquet, JSON lines and arrow files; `register(name, source)` registers a
question -> answer task over any source (rekey, tokenize,
CacheDatasetPlaceholder, append_eos_after_trim; embedded vocabulary).

Importing this module registers `hf_qa` over the saved directory named by the
environment variable T5XLIKE_TEST_HF_DATASET when it is set (how a
`python -m t5xlike.train` subprocess with
`--gin.MIXTURE_OR_TASK_MODULE=tests.hf_tasks` finds the test's dataset).
"""
from __future__ import annotations

import functools
import os
import pathlib

import numpy as np
import seqio

from t5xlike.data import hf_sources
from t5xlike.tasks import embedded

ENV = "T5XLIKE_TEST_HF_DATASET"
# Python sentencepiece and tf_text's op segment this tie differently ('___').
TIE = "if __name___ == '__main__': run()"
WORDS = ("the quick brown fox jumps over a lazy dog while seven tiny robots sing about "
         "rivers, mountains and café ünïcode text").split()
SIZES = {"train": 57, "validation": 9}


def sentence(seed: int) -> str:
  rng = np.random.default_rng(seed)
  return " ".join(rng.choice(WORDS, size=int(rng.integers(0, 20))))


def rows(split: str) -> dict[str, list]:
  """Columns of `split`: question, answer (strings; one empty, one the tie), label
  (int), ids (list of int), meta (a struct)."""
  start = 0 if split == "train" else 1000
  indices = range(start, start + SIZES[split])
  answers = [TIE if i == start + 3 else "" if i == start + 5 else sentence(2 * i + 1)
             for i in indices]
  return {"question": [f"question {i}: {sentence(2 * i)}?" for i in indices],
          "answer": answers, "label": [i % 3 for i in indices],
          "ids": [list(range(i % 4)) for i in indices],
          "meta": [{"source": f"s{i % 2}", "score": i / 8} for i in indices]}


def write_dataset(directory: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """Writes directory/saved (save_to_disk) and the train split as files: {format: paths}."""
  import datasets
  directory.mkdir(parents=True, exist_ok=True)
  saved = datasets.DatasetDict({s: datasets.Dataset.from_dict(rows(s)) for s in SIZES})
  saved.save_to_disk(str(directory / "saved"), num_shards={"train": 2, "validation": 1})
  train = saved["train"]
  halves = [train.select(range(0, 30)), train.select(range(30, len(train)))]
  files: dict[str, list[pathlib.Path]] = {"parquet": [], "json": []}
  for k, half in enumerate(halves):
    files["parquet"].append(directory / f"train-{k}.parquet")
    half.to_parquet(str(files["parquet"][-1]))
    files["json"].append(directory / f"train-{k}.jsonl")
    half.to_json(str(files["json"][-1]), force_ascii=False)
  files["arrow"] = sorted((directory / "saved" / "train").glob("data-*.arrow"))
  return files


def register(name: str, source: hf_sources.HfDatasetSource,
             key_map: dict[str, str] | None = None) -> None:
  """Registers (or replaces) a question -> answer task `name` over `source`."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey,
                            key_map=key_map or {"inputs": "question", "targets": "answer"}),
          seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim],
      output_features={k: seqio.Feature(embedded.vocabulary(), add_eos=True)
                       for k in ("inputs", "targets")},
      metric_fns=[])


if os.environ.get(ENV):
  register("hf_qa", hf_sources.HfDatasetSource(os.environ[ENV]))

"""An offline multitask mixture: six word games over the embedded corpus.

Instruction-tuning in miniature (T0 / FLAN style: several prompt templates per
task, a held-out task for zero-shot evaluation), small enough for the tiny
quickstart model to partly learn in a few hundred steps, with no download.

Source text: the embedded corpus (`t5xlike.tasks.embedded`), lower-cased and cut into
*runs*: maximal sequences of plain words (1-12 letters a-z; a trailing comma
or semicolon is dropped) within a sentence; a run ends at `.`, `!`, `?`, `:`
and at any other token (code, numbers, symbols). Each task cuts the runs
into phrases of its own length range, with lengths, blank positions and the
subset kept all chosen by CRC-32 hashes of the task's name and a counter:
the examples are a pure function of the corpus. `train` comes from the
corpus's train documents and `validation` from its validation documents.

Tasks (train / validation examples; metric; fields -> templates):
  mt_reverse_words  10,000 / 300   sequence_accuracy
      3-6 words: "Reverse the order of these words: {phrase}" | "Write these
      words backwards, last word first: {phrase}" | "{phrase} -- the same
      words in reverse order:"  ->  "{reversed}"
  mt_count_words     5,000 / 300   accuracy (targets "3" ... "9")
      3-9 words: "How many words are in this phrase? {phrase}" | "Count the
      words: {phrase}" | "{phrase} -- number of words:"  ->  "{count}"
  mt_first_word      4,000 / 300   accuracy
      3-8 words: "What is the first word of this phrase? {phrase}" | "Give
      the first word: {phrase}" | "{phrase} -- the first word is:"  ->  "{word}"
  mt_fill_blank     10,000 / 300   accuracy
      6-12 words, one replaced by ___: "Fill in the blank: {masked}" |
      "Which word is missing? {masked}" | "{masked} -- the missing word is:"
      ->  "{word}"
  mt_continue        7,000 / 300   bleu, rouge (rouge1, rouge2, rougeLsum)
      8-14 words cut before the last 3-6: "Continue the text: {prefix}" |
      "How does this sentence go on? {prefix}" | "{prefix} ..."  ->
      "{continuation}"
  mt_last_word       4,000 / 300   accuracy   (held out)
      3-8 words: "What is the last word of this phrase? {phrase}" | "Give
      the last word: {phrase}" | "{phrase} -- the last word is:"  ->  "{word}"

The template of an example is chosen by `t5xlike.tasks.prompts.apply_templates`
(seeded hash of its fields: the same in every epoch and after a restart).
Lengths on the embedded vocabulary: inputs <= 48 tokens, targets <= 24
(before EOS), so TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 32} never
truncates. Predictions and targets are `str.strip`ped (`postprocess_fn`).

Mixtures (rates: examples-proportional, `t5xlike.tasks.mixtures.add_mixture`):
  multitask_offline          the five tasks other than mt_last_word, each
                             task's count capped at 6,000: rates
                             6,000 : 5,000 : 4,000 : 6,000 : 6,000
                             (reverse, count, first, blank, continue).
  multitask_offline_heldout  mt_last_word (zero-shot evaluation of a task
                             not trained on).
  multitask_offline_all      all six, capped at 6,000.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from collections.abc import Callable

import seqio
import tensorflow as tf

from t5xlike import text_metrics
from t5xlike.tasks import embedded, mixtures, prompts
from t5xlike.tasks.prompts import Template

SPLITS = ("train", "validation")
MAXIMUM = 6_000  # The mixtures' cap on each task's example count.
_WORD = re.compile(r"[a-z]{1,12}")
_SENTENCE_END = (".", "!", "?", ":")


# -- phrases of the corpus -------------------------------------------------------
def _hash(*parts: object) -> int:
  """A stable 32-bit hash of the parts (CRC-32 of their text)."""
  return zlib.crc32("\x1f".join(str(p) for p in parts).encode("utf-8"))


def _line_runs(line: str) -> list[tuple[str, ...]]:
  """The plain-word runs of one line (see the module docstring)."""
  found, run = [], []
  for token in line.split():
    word = token.lower().rstrip(",;")
    end = word.endswith(_SENTENCE_END)
    word = word.rstrip("".join(_SENTENCE_END))
    if _WORD.fullmatch(word):
      run.append(word)
    else:
      end = True
    if end:
      if run:
        found.append(tuple(run))
      run = []
  if run:
    found.append(tuple(run))
  return found


@functools.cache
def runs(split: str) -> tuple[tuple[str, ...], ...]:
  """The plain-word runs of the corpus split, in document order."""
  return tuple(run for document in embedded.read_documents(split)
               for line in document["text"].split("\n") for run in _line_runs(line))


def phrases(split: str, shortest: int, longest: int, salt: str) -> list[tuple[str, ...]]:
  """Runs cut into consecutive phrases of `shortest`..`longest` words.

  Each cut's length is drawn by hash(salt, cut number); a run's tail shorter
  than the drawn length is used whole when it has at least `shortest` words.
  """
  out = []
  for run in runs(split):
    start = 0
    while len(run) - start >= shortest:
      length = shortest + _hash(salt, "length", len(out)) % (longest - shortest + 1)
      out.append(run[start:start + length])
      start += length
  return out


def _subset(items: list, size: int, salt: str) -> list:
  """At most `size` items, chosen by hash and kept in their order."""
  if len(items) <= size:
    return items
  chosen = sorted(range(len(items)), key=lambda i: _hash(salt, "keep", i))[:size]
  return [items[i] for i in sorted(chosen)]


# -- the tasks ---------------------------------------------------------------------
Fields = dict[str, str]


def _reverse(words: tuple[str, ...], salt: str, i: int) -> Fields:
  del salt, i
  return {"phrase": " ".join(words), "reversed": " ".join(reversed(words))}


def _count(words: tuple[str, ...], salt: str, i: int) -> Fields:
  del salt, i
  return {"phrase": " ".join(words), "count": str(len(words))}


def _first(words: tuple[str, ...], salt: str, i: int) -> Fields:
  del salt, i
  return {"phrase": " ".join(words), "word": words[0]}


def _last(words: tuple[str, ...], salt: str, i: int) -> Fields:
  del salt, i
  return {"phrase": " ".join(words), "word": words[-1]}


def _blank(words: tuple[str, ...], salt: str, i: int) -> Fields:
  position = _hash(salt, "blank", i) % len(words)
  masked = words[:position] + ("___",) + words[position + 1:]
  return {"masked": " ".join(masked), "word": words[position]}


def _continue(words: tuple[str, ...], salt: str, i: int) -> Fields:
  tail = min(3 + _hash(salt, "tail", i) % 4, len(words) - 5)  # 3-6 words, prefix >= 5.
  return {"prefix": " ".join(words[:-tail]), "continuation": " ".join(words[-tail:])}


@dataclasses.dataclass(frozen=True)
class WordTask:
  """One task: phrase lengths, how a phrase becomes fields, templates, metrics."""
  name: str
  shortest: int
  longest: int
  make: Callable[[tuple[str, ...], str, int], Fields]
  templates: tuple[Template, ...]
  metric_fns: tuple[Callable, ...]
  sizes: tuple[tuple[str, int], ...] = (("train", 10_000), ("validation", 300))


TASKS = (
    WordTask("mt_reverse_words", 3, 6, _reverse, (
        Template("Reverse the order of these words: {phrase}", "{reversed}"),
        Template("Write these words backwards, last word first: {phrase}", "{reversed}"),
        Template("{phrase} -- the same words in reverse order:", "{reversed}"),
    ), (text_metrics.sequence_accuracy,)),
    WordTask("mt_count_words", 3, 9, _count, (
        Template("How many words are in this phrase? {phrase}", "{count}"),
        Template("Count the words: {phrase}", "{count}"),
        Template("{phrase} -- number of words:", "{count}"),
    ), (text_metrics.accuracy,), (("train", 5_000), ("validation", 300))),
    WordTask("mt_first_word", 3, 8, _first, (
        Template("What is the first word of this phrase? {phrase}", "{word}"),
        Template("Give the first word: {phrase}", "{word}"),
        Template("{phrase} -- the first word is:", "{word}"),
    ), (text_metrics.accuracy,), (("train", 4_000), ("validation", 300))),
    WordTask("mt_fill_blank", 6, 12, _blank, (
        Template("Fill in the blank: {masked}", "{word}"),
        Template("Which word is missing? {masked}", "{word}"),
        Template("{masked} -- the missing word is:", "{word}"),
    ), (text_metrics.accuracy,)),
    WordTask("mt_continue", 8, 14, _continue, (
        Template("Continue the text: {prefix}", "{continuation}"),
        Template("How does this sentence go on? {prefix}", "{continuation}"),
        Template("{prefix} ...", "{continuation}"),
    ), (text_metrics.bleu, text_metrics.rouge), (("train", 7_000), ("validation", 300))),
    WordTask("mt_last_word", 3, 8, _last, (
        Template("What is the last word of this phrase? {phrase}", "{word}"),
        Template("Give the last word: {phrase}", "{word}"),
        Template("{phrase} -- the last word is:", "{word}"),
    ), (text_metrics.accuracy,), (("train", 4_000), ("validation", 300))),
)
BY_NAME = {task.name: task for task in TASKS}
HELD_OUT = ("mt_last_word",)
TRAINING = tuple(task.name for task in TASKS if task.name not in HELD_OUT)


@functools.cache
def examples(name: str, split: str) -> tuple[Fields, ...]:
  """The raw string fields of a task's split (before templates), in source order."""
  task = BY_NAME[name]
  if split not in SPLITS:
    raise ValueError(f"task {name!r} has no split {split!r} (splits: {SPLITS})")
  chosen = _subset(phrases(split, task.shortest, task.longest, name), dict(task.sizes)[split],
                   name)
  return tuple(task.make(words, name, i) for i, words in enumerate(chosen))


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *,
                name: str) -> tf.data.Dataset:
  del shuffle_files, seed  # Generated in a fixed order.
  rows = examples(name, split)
  return tf.data.Dataset.from_tensor_slices({key: [row[key] for row in rows] for key in rows[0]})


def strip(text: str, **unused_kwargs) -> str:
  """postprocess_fn: the decoded text without surrounding whitespace."""
  return text.strip()


def _register_task(task: WordTask) -> None:
  vocabulary = embedded.vocabulary()
  seqio.TaskRegistry.add(
      task.name,
      source=seqio.FunctionDataSource(functools.partial(_dataset_fn, name=task.name),
                                      splits=SPLITS),
      preprocessors=[prompts.apply_templates(task.templates, seed=0),
                     seqio.preprocessors.tokenize,
                     seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim],
      output_features={key: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)
                       for key in ("inputs", "targets")},
      postprocess_fn=strip,
      metric_fns=list(task.metric_fns))


def register() -> None:
  """Registers the tasks and mixtures above (idempotent)."""
  for task in TASKS:
    if task.name not in seqio.TaskRegistry.names():
      _register_task(task)
  mixtures.add_mixture("multitask_offline", TRAINING, maximum=MAXIMUM)
  mixtures.add_mixture("multitask_offline_heldout", HELD_OUT, maximum=MAXIMUM)
  mixtures.add_mixture("multitask_offline_all", [task.name for task in TASKS], maximum=MAXIMUM)


register()

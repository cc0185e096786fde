"""Sequence-classification tasks (GLUE-style) for encoder fine-tuning.

Every task has two output features, the ones the `encoder_classification`
feature converter reads:
  inputs  token ids of the embedded SentencePiece vocabulary, EOS appended
          after trimming (int32 [length]);
  label   the class, an int32 scalar (`seqio.Feature(..., rank=0)`; kept by
          `t5xlike.data.sources` as a non-token numeric feature).

Registered seqio tasks:
  cls_word_order  OFFLINE, from the embedded corpus (`t5xlike.tasks.embedded`): is a
                  sentence in its original word order (label 0) or were its
                  words shuffled (label 1)? Sentences of 6-24 words and at
                  most 63 tokens, lower-cased, final punctuation removed (so
                  that neither capitals nor a final period give the order
                  away); the label and the permutation come from a SHA-256
                  hash of the sentence, so the data is the same on every
                  machine. `train`: 4,096 sentences of the corpus's train
                  documents; `validation`: 512 of its validation documents
                  (about half of each class).
  cls_word_order_300  the small-training-set regime (Tinn et al. 2023's
                  fine-tuning stability): the first 300 `train` sentences of
                  cls_word_order (themselves a hash-picked sample), the same
                  `validation`.
  glue_sst2_cls   GLUE SST-2 (TFDS `glue/sst2:2.0.0`; `sentence` -> inputs,
                  `label` 0 negative / 1 positive; the `test` split's labels
                  are -1, which `ClassifierModel` does not score). The TFDS
                  data must be prepared beforehand (`tfds build glue/sst2`);
                  the tests run it under `tfds.testing.mock_data`.
"""
from __future__ import annotations

import functools
import hashlib
import re

import numpy as np
import seqio
import tensorflow as tf

from t5xlike.tasks import embedded

SPLITS = ("train", "validation")
#: Sentences per split of cls_word_order.
NUM_EXAMPLES = {"train": 4096, "validation": 512}
#: Training sentences of cls_word_order_300.
SMALL_TRAIN_EXAMPLES = 300
MIN_WORDS, MAX_WORDS = 6, 24
#: Tokens of a sentence at most (EOS makes 64, the configs' feature length).
MAX_TOKENS = 63
SST2_TFDS_NAME = "glue/sst2:2.0.0"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TRAILING = re.compile(r"[\s.!?:;,]+$")


def label_feature(num_classes: int) -> seqio.Feature:
  """The `label` output feature: an int32 scalar in [0, num_classes), no EOS."""
  return seqio.Feature(seqio.PassThroughVocabulary(num_classes), add_eos=False, dtype=tf.int32,
                       rank=0)


def _inputs_feature() -> seqio.Feature:
  return seqio.Feature(embedded.vocabulary(), add_eos=True, dtype=tf.int32)


def _digest(*parts: str) -> bytes:
  return hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()


def sentences(split: str) -> list[str]:
  """Distinct normalised sentences of the embedded corpus's `split` with
  MIN_WORDS..MAX_WORDS words, in corpus order (lower-cased, final punctuation
  removed, whitespace collapsed)."""
  seen, out = set(), []
  for doc in embedded.read_documents(split):
    for paragraph in doc["text"].split("\n"):
      for sentence in _SENTENCE_END.split(paragraph.strip()):
        text = " ".join(_TRAILING.sub("", sentence.lower()).split())
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS and text not in seen:
          seen.add(text)
          out.append(text)
  return out


def shuffled_words(text: str, seed: bytes) -> str | None:
  """The words of `text` in an order drawn from `seed`, different from the
  original (None when every order reads the same, e.g. repeated words only)."""
  words = text.split()
  rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
  for _ in range(4):
    candidate = " ".join(words[i] for i in rng.permutation(len(words)))
    if candidate != text:
      return candidate
  return None


@functools.cache
def word_order_examples(split: str) -> tuple[tuple[str, int], ...]:
  """(text, label) pairs of cls_word_order: NUM_EXAMPLES[split] sentences
  picked by hash (a uniform, seed-free sample), in corpus order; label 1:
  words shuffled, 0: original."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} of cls_word_order; known: {SPLITS}")
  candidates = sorted(sentences(split), key=lambda s: _digest("pick", split, s))
  vocabulary = embedded.vocabulary()
  picked = []
  for text in candidates:
    if len(picked) == NUM_EXAMPLES[split]:
      break
    if len(vocabulary.encode(text)) > MAX_TOKENS:
      continue
    digest = _digest("label", split, text)
    label = digest[0] & 1
    if label:
      text = shuffled_words(text, digest[1:])
      if text is None:
        continue
    picked.append((text, label))
  return tuple(picked)


def _word_order_fn(split: str, shuffle_files: bool, seed: int | None = None,
                   train_examples: int | None = None) -> tf.data.Dataset:
  """cls_word_order's `split`; `train_examples`: only the first so many of `train`."""
  del shuffle_files, seed  # Deterministic order; the pipeline shuffles by index.
  examples = word_order_examples(split)
  if split == "train" and train_examples is not None:
    examples = examples[:train_examples]
  texts, labels = zip(*examples)
  return tf.data.Dataset.from_tensor_slices({"inputs": list(texts),
                                             "label": np.asarray(labels, np.int32)})


@seqio.map_over_dataset
def _label_to_int32(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  return {**example, "label": tf.cast(example["label"], tf.int32)}


def register() -> None:
  """Registers cls_word_order, cls_word_order_300 and glue_sst2_cls (idempotent)."""
  if "cls_word_order" in seqio.TaskRegistry.names():
    return
  features = {"inputs": _inputs_feature(), "label": label_feature(2)}
  for name, train_examples in (("cls_word_order", None),
                               (f"cls_word_order_{SMALL_TRAIN_EXAMPLES}", SMALL_TRAIN_EXAMPLES)):
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            functools.partial(_word_order_fn, train_examples=train_examples), splits=SPLITS),
        preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                       seqio.preprocessors.append_eos_after_trim],
        output_features=features,
        metric_fns=[])
  seqio.TaskRegistry.add(
      "glue_sst2_cls",
      source=seqio.TfdsDataSource(tfds_name=SST2_TFDS_NAME,
                                  splits=("train", "validation", "test")),
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey,
                            key_map={"inputs": "sentence", "label": "label"}),
          _label_to_int32,
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=features,
      metric_fns=[])


register()

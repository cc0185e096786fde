"""An offline preference task over the embedded corpus: the true continuation vs a corrupted one.

Preference tuning in miniature, with no download: each example is a prompt
"Continue the text: {prefix}" cut from a plain-word phrase of the embedded
corpus (`tasks.multitask.phrases`: 8-14 words, the last 3-6 words cut off),
the *chosen* completion is the true continuation and the *rejected* one the
same words rotated by one (the first word moved to the end: same words, same
length, wrong order), so a preference can only come from word order, which a
language model trained on the corpus partly knows and preference tuning
sharpens. Examples whose rotation equals the continuation are dropped.

Tasks (train / validation examples):
  pref_continue      7,000 / 300   pairwise: `inputs`, `chosen`, `rejected`
                                   (`data.pairwise`; DPO / IPO / SimPO gins)
  pref_continue_sft  7,000 / 300   the same prompts -> `targets` = the chosen
                                   completion: the SFT stage before preference
                                   tuning (`runs/finetune.gin`); metric: BLEU

`pref_continue` registers its reward for on-policy sampling
(`posttrain.rewards.bigram_f1` against the chosen completion). Lengths on
the embedded vocabulary (before EOS): inputs <= 35 tokens in train, <= 18 in
validation; completions <= 17 and <= 12. The gins' TASK_FEATURE_LENGTHS
{'inputs': 24, 'chosen': 16, 'rejected': 16} (SFT: {'inputs': 24, 'targets':
16}) keep every validation pair whole and trim the end of a few training ones.
"""
from __future__ import annotations

import functools
import zlib

import seqio
import tensorflow as tf

from t5xlike import text_metrics
from t5xlike.posttrain import rewards
from t5xlike.tasks import embedded, multitask

SPLITS = ("train", "validation")
SIZES = {"train": 7_000, "validation": 300}
NAME = "pref_continue"
SFT_NAME = "pref_continue_sft"
PROMPT = "Continue the text: {prefix}"


def _hash(*parts: object) -> int:
  """A stable 32-bit hash of the parts (CRC-32 of their text)."""
  return zlib.crc32("\x1f".join(str(p) for p in parts).encode("utf-8"))


@functools.cache
def examples(split: str) -> tuple[dict[str, str], ...]:
  """{'inputs', 'chosen', 'rejected'} strings of a split, in source order."""
  if split not in SPLITS:
    raise ValueError(f"task {NAME!r} has no split {split!r} (splits: {SPLITS})")
  out = []
  for i, words in enumerate(multitask.phrases(split, 8, 14, NAME)):
    tail = min(3 + _hash(NAME, "tail", i) % 4, len(words) - 5)
    continuation = words[-tail:]
    rotated = continuation[1:] + continuation[:1]
    if rotated != continuation:
      out.append({"inputs": PROMPT.format(prefix=" ".join(words[:-tail])),
                  "chosen": " ".join(continuation), "rejected": " ".join(rotated)})
  if len(out) > SIZES[split]:  # A subset chosen by hash, kept in source order.
    keep = sorted(range(len(out)), key=lambda i: _hash(NAME, "keep", i))[:SIZES[split]]
    out = [out[i] for i in sorted(keep)]
  return tuple(out)


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *,
                sft: bool) -> tf.data.Dataset:
  del shuffle_files, seed  # Generated in a fixed order.
  rows = examples(split)
  if sft:
    return tf.data.Dataset.from_tensor_slices({"inputs": [r["inputs"] for r in rows],
                                               "targets": [r["chosen"] for r in rows]})
  return tf.data.Dataset.from_tensor_slices({k: [r[k] for r in rows] for k in rows[0]})


def register() -> None:
  """Registers both tasks and the reward (idempotent)."""
  vocabulary = embedded.vocabulary()
  features = lambda names: {k: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)
                            for k in names}
  if NAME not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        NAME, source=seqio.FunctionDataSource(functools.partial(_dataset_fn, sft=False),
                                              splits=SPLITS),
        preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                       seqio.preprocessors.append_eos_after_trim],
        output_features=features(("inputs", "chosen", "rejected")), metric_fns=[])
  if SFT_NAME not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        SFT_NAME, source=seqio.FunctionDataSource(functools.partial(_dataset_fn, sft=True),
                                                  splits=SPLITS),
        preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                       seqio.preprocessors.append_eos_after_trim],
        output_features=features(("inputs", "targets")), postprocess_fn=multitask.strip,
        metric_fns=[text_metrics.bleu])
  rewards.register(NAME, rewards.bigram_f1)


register()

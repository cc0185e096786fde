"""T5 span corruption (Raffel et al. 2020, "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer", §3.1.4 and §3.3.4), in NumPy.

A fraction `noise_density` of the tokens, in spans of mean length
`mean_noise_span_length`, is dropped from the inputs; each dropped span is
replaced by one sentinel and the targets list the dropped spans, each after
its sentinel. Sentinels count down from the top of the vocabulary
(`<extra_id_0>` = vocab_size - 1), and both sequences end with EOS:

  tokens   a b c d e f g h
  inputs   a b <X0> e f <X1> h EOS          (c d and g are noise)
  targets  <X0> c d <X1> g EOS

The layout of spans follows T5's `random_spans_noise_mask`: the sequence
alternates non-noise / noise spans, starts with non-noise, ends with noise,
and span lengths are random partitions of the noise and non-noise counts.
The counts are T5's too, computed as its TensorFlow code does, in float32
with round-half-to-even (`noise_counts`): float64 would round differently
where L·r lands on a half (L = 190, r = 0.15: 28.5 in float32, 28.4999... in
float64), one noise token and one span fewer than T5.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from t5xlike.objectives import base


def noise_counts(length: int, noise_density: float,
                 mean_noise_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a sequence of `length` tokens, as T5's
  `random_spans_noise_mask` counts them (t5/data/preprocessors.py):
  round(float32(length) * r), clamped to [1, length - 1], and
  round(float32(noise) / μ), at least 1; `tf.round` rounds half to even, as
  `np.rint` does. `length` below 2 counts as 2 (T5's degeneracy guard).
  """
  length = max(int(length), 2)
  num_noise = int(np.rint(np.float32(length) * np.float32(noise_density)))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = int(np.rint(np.float32(num_noise) / np.float32(mean_noise_span_length)))
  return num_noise, max(num_spans, 1)


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
  """T5's `random_spans_helper`: raw tokens per example and the targets length.

  Finds the largest number of raw tokens whose corrupted inputs (non-noise
  tokens + one sentinel per span + EOS) fit in `inputs_length`; e.g. 512 ->
  (568, 114) and 128 -> (141, 29) with the defaults.
  """
  def lengths(tokens_length):
    # Counted exactly as the mask counts them (`noise_counts`): at least one
    # span (T5's helper omits that, which lets a μ much longer than the noise
    # overflow the inputs by one sentinel) and float32 rounding (T5's helper
    # rounds in float64: where the two differ, T5's targets can outgrow the helper's length).
    num_noise, num_spans = noise_counts(tokens_length, noise_density, mean_noise_span_length)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

  if inputs_length < 3:
    raise ValueError(f"inputs length {inputs_length} is too short for span corruption")
  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  _, targets_length = lengths(tokens_length)
  if noise_density == 0.5 and targets_length > inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
  """Random partition of `num_items` into `num_segments` non-empty segments (lengths)."""
  first_in_segment = np.zeros(num_items, dtype=np.int64)
  cuts = rng.permutation(num_items - 1)[:num_segments - 1] + 1
  first_in_segment[cuts] = 1
  segment_id = np.cumsum(first_in_segment)
  return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """Boolean mask [length]: True where the token is noise (T5's algorithm)."""
  orig_length = length
  length = max(length, 2)
  num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
  num_nonnoise = length - num_noise
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, rng)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  span_starts = np.cumsum(interleaved)[:-1]
  indicator = np.zeros(length, dtype=np.int64)
  indicator[span_starts] = 1
  span_num = np.cumsum(indicator)
  return (span_num % 2 == 1)[:orig_length]


def _spans_to_sentinels(tokens: np.ndarray, mask: np.ndarray, first_sentinel: int) -> np.ndarray:
  """Replaces each run of masked tokens by one sentinel, counting down from `first_sentinel`."""
  previous = np.concatenate([[False], mask[:-1]])
  first = mask & ~previous
  sentinels = first_sentinel + 1 - np.cumsum(first)
  out = np.where(first, sentinels, tokens)
  return out[~(mask & previous)]


class SpanCorruption(base.Objective):
  """T5's span-corruption denoising objective.

  Args:
    noise_density: fraction of tokens corrupted (T5: 0.15).
    mean_noise_span_length: mean corrupted span length (T5: 3).
  """

  name = "span_corruption"

  def __init__(self, noise_density: float = 0.15, mean_noise_span_length: float = 3.0):
    if not 0.0 < noise_density < 1.0:
      raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_noise_span_length < 1.0:
      raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")
    self.noise_density = noise_density
    self.mean_noise_span_length = mean_noise_span_length

  def raw_length(self, feature_lengths: Mapping[str, int]) -> int:
    for key in ("inputs", "targets"):
      if key not in feature_lengths:
        raise ValueError(f"span corruption needs TASK_FEATURE_LENGTHS[{key!r}]")
    raw, targets = span_corruption_lengths(feature_lengths["inputs"], self.noise_density,
                                           self.mean_noise_span_length)
    if feature_lengths["targets"] < targets:
      raise ValueError(
          f"TASK_FEATURE_LENGTHS['targets']={feature_lengths['targets']} is too short: span "
          f"corruption of inputs length {feature_lengths['inputs']} makes targets of length "
          f"{targets}")
    return raw

  def transform(self, tokens: np.ndarray, rng: np.random.Generator, *, vocab_size: int,
                eos_id: int) -> dict[str, np.ndarray]:
    tokens = np.asarray(tokens, dtype=np.int32)
    mask = random_spans_noise_mask(len(tokens), self.noise_density,
                                   self.mean_noise_span_length, rng)
    sentinel = vocab_size - 1
    inputs = _spans_to_sentinels(tokens, mask, sentinel)
    targets = _spans_to_sentinels(tokens, ~mask, sentinel)
    eos = np.array([eos_id], dtype=np.int32)
    return {"inputs": np.concatenate([inputs, eos]).astype(np.int32),
            "targets": np.concatenate([targets, eos]).astype(np.int32)}

  def example_stats(self, raw: np.ndarray, features) -> dict[str, float]:
    # inputs = non-noise + spans + EOS, targets = noise + spans + EOS and
    # raw = non-noise + noise, so the counts follow from the three lengths.
    inputs, targets = len(features["inputs"]), len(features["targets"])
    spans = (inputs + targets - len(raw) - 2) // 2
    return {"original_tokens": len(raw), "noise_tokens": targets - 1 - spans,
            "noise_spans": spans}

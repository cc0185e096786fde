"""Language-modelling objectives: causal LM and prefix LM, in NumPy.

Causal LM (Radford et al. 2018; T5's `lm` objective, Raffel et al. 2020
§3.3.2): each example is a chunk of `TASK_FEATURE_LENGTHS['targets']` tokens
of the concatenated text stream, predicted left to right:

  tokens   a b c d      ->   targets  a b c d

Prefix LM (Raffel et al. 2020 §3.3.2, "prefix language modeling"; UL2's
S-denoiser, Tay et al. 2022 §3.1.2): a chunk is split into a prefix (the
inputs, read bidirectionally) and the rest (the targets); both end with EOS:

  tokens   a b c d e   split 2  ->  inputs  a b EOS   targets  c d e EOS

The split follows T5's `random_prefix_noise_mask`: with `noise_density` d
over a chunk of L tokens the prefix length is uniform in
[max(1, round((1 - 2d)(L - 1))), L - 1], so for d = 0.5 (T5's and UL2's
setting) the split point is uniform over the chunk and the targets are half
the tokens on average. `split='fixed'` makes the targets exactly the last
round(d * L) tokens instead. A split given by the task is a supervised task
(`inputs`/`targets`) trained with no objective (`objective = None`): the
decoder feature converter then makes the same prefix-LM rows.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from t5xlike.objectives import base

SPLIT_RULES = ("uniform", "fixed")


class CausalLM(base.Objective):
  """Left-to-right language modelling over chunks of `targets` tokens (no EOS added)."""

  name = "causal_lm"

  def raw_length(self, feature_lengths: Mapping[str, int]) -> int:
    if "targets" not in feature_lengths:
      raise ValueError("causal LM needs TASK_FEATURE_LENGTHS['targets'] (the sequence length)")
    if feature_lengths["targets"] < 2:
      raise ValueError(f"TASK_FEATURE_LENGTHS['targets']={feature_lengths['targets']} is too "
                       "short for language modelling")
    return feature_lengths["targets"]

  def transform(self, tokens: np.ndarray, rng: np.random.Generator, *, vocab_size: int,
                eos_id: int) -> dict[str, np.ndarray]:
    del rng, vocab_size, eos_id
    return {"targets": np.asarray(tokens, dtype=np.int32)}

  def example_stats(self, raw, features) -> dict[str, float]:
    # Every token is predicted: one "span" covering the whole chunk.
    return {"original_tokens": len(raw), "noise_tokens": len(features["targets"]),
            "noise_spans": 1}


def prefix_length(length: int, noise_density: float, rng: np.random.Generator) -> int:
  """T5's `random_prefix_noise_mask` split: prefix tokens of a chunk of `length` tokens."""
  max_inputs = length - 1
  min_inputs = min(max_inputs, max(1, int(round((1.0 - 2.0 * noise_density) * max_inputs))))
  return int(rng.integers(min_inputs, max_inputs + 1))


class PrefixLM(base.Objective):
  """Prefix language modelling: predict the rest of a chunk from its prefix.

  Args:
    noise_density: the expected fraction of the chunk in the targets (0.5:
      uniform split point, as T5's `prefix_lm` and UL2's S-denoiser).
    split: 'uniform' (T5's random prefix) or 'fixed' (targets = the last
      round(noise_density * L) tokens).
  """

  name = "prefix_lm"

  def __init__(self, noise_density: float = 0.5, split: str = "uniform"):
    if split not in SPLIT_RULES:
      raise ValueError(f"unknown prefix-LM split rule {split!r}; known: {SPLIT_RULES}")
    if not 0.0 < noise_density < 1.0:
      raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    self.noise_density = noise_density
    self.split = split

  def raw_length(self, feature_lengths: Mapping[str, int]) -> int:
    """T5's `prefix_lm`: chunks of `inputs - 1` tokens (room for EOS), so that both
    the prefix and the rest (plus EOS) fit their feature lengths."""
    for key in ("inputs", "targets"):
      if key not in feature_lengths:
        raise ValueError(f"prefix LM needs TASK_FEATURE_LENGTHS[{key!r}]")
    length = feature_lengths["inputs"] - 1
    if length < 2:
      raise ValueError(f"TASK_FEATURE_LENGTHS['inputs']={feature_lengths['inputs']} is too "
                       "short for prefix LM")
    if feature_lengths["targets"] < length:
      raise ValueError(f"TASK_FEATURE_LENGTHS['targets']={feature_lengths['targets']} is too "
                       f"short: prefix LM over chunks of {length} tokens makes targets of up to "
                       f"{length} tokens (EOS included)")
    return length

  def split_point(self, length: int, rng: np.random.Generator) -> int:
    if self.split == "fixed":
      return min(max(length - int(round(self.noise_density * length)), 1), length - 1)
    return prefix_length(length, self.noise_density, rng)

  def transform(self, tokens: np.ndarray, rng: np.random.Generator, *, vocab_size: int,
                eos_id: int) -> dict[str, np.ndarray]:
    del vocab_size
    tokens = np.asarray(tokens, dtype=np.int32)
    if len(tokens) < 2:  # A last, tiny chunk: everything is target.
      split = 0
    else:
      split = self.split_point(len(tokens), rng)
    eos = np.array([eos_id], dtype=np.int32)
    return {"inputs": np.concatenate([tokens[:split], eos]),
            "targets": np.concatenate([tokens[split:], eos])}

  def example_stats(self, raw, features) -> dict[str, float]:
    targets = len(features["targets"]) - 1
    return {"original_tokens": len(raw), "noise_tokens": targets, "noise_spans": 1}

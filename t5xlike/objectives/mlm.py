"""BERT's masked-LM corruption (Devlin et al. 2019, "BERT: Pre-training of
Deep Bidirectional Transformers for Language Understanding", §3.1 "Task #1:
Masked LM" and Appendix A.1), in NumPy.

Of a chunk of n tokens, round(mask_rate * n) positions (at least 1) are
chosen uniformly without replacement; each chosen position independently
becomes [MASK] with probability `mask_token_fraction` (0.8), a random token
with probability `random_token_fraction` (0.1), and stays unchanged
otherwise (0.1). The model predicts the original token at every chosen
position (`mlm_weights` = 1 there), whatever happened to it:

  tokens       a  b  c  d  e  f  g  h
  inputs       a  M  c  d  e  x  g  h        (b -> [MASK], f -> random x)
  targets      a  b  c  d  e  f  g  h
  mlm_weights  0  1  0  0  0  1  0  0

No EOS is appended: an encoder objective keeps the chunk's length, so
`raw_length` is `TASK_FEATURE_LENGTHS['inputs']` and the `encoder` feature
converter pads `inputs`, `targets` and `mlm_weights` to that length.

Chunks or whole examples: by default the task's token stream is cut into
full chunks of that length (no padding at all). `whole_examples=True` masks
each example of the task as it is (its first `inputs` tokens: longer ones are
truncated before masking), as BERT-style pretraining on documents or
sentences of their own length does: rows are then padded, unless the run
packs them (MosaicBERT's unpadding, `objectives/mosaicbert.gin`).

Token ids, for a T5-style vocabulary of `vocab_size` ids whose top
`num_reserved_ids` (100) are the sentinels `<extra_id_99> .. <extra_id_0>`:
[MASK] is `mask_id`, by default `vocab_size - 1` (= `<extra_id_0>`, the
first sentinel, which plain text never contains); random replacements are
drawn uniformly from the real tokens [1, vocab_size - num_reserved_ids)
without EOS, never padding (0) or a sentinel.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

from t5xlike.objectives import base


@functools.lru_cache(maxsize=16)
def _replacement_ids(vocab_size: int, eos_id: int, num_reserved_ids: int) -> np.ndarray:
  """The ids a random replacement may take: [1, vocab_size - num_reserved_ids) minus EOS."""
  high = vocab_size - num_reserved_ids
  ids = np.arange(1, high, dtype=np.int32)
  ids = ids[ids != eos_id]
  if ids.size == 0:
    raise ValueError(f"no real token to draw random replacements from: vocab_size={vocab_size}, "
                     f"num_reserved_ids={num_reserved_ids}, eos_id={eos_id}")
  ids.setflags(write=False)
  return ids


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, *, mask_rate: float,
                mask_token_fraction: float, random_token_fraction: float, mask_id: int,
                replacement_ids: np.ndarray) -> dict[str, np.ndarray]:
  """BERT masking of one sequence (see the module docstring).

  Args:
    tokens: int [n], the original tokens.
    rng: draws, in this order, the chosen positions (a permutation), one
      uniform number per chosen position (deciding [MASK] / random / keep)
      and then the random replacements.
    mask_rate: fraction of positions chosen (round(mask_rate * n), at least 1).
    mask_token_fraction, random_token_fraction: probabilities, per chosen
      position, of [MASK] and of a random token; the rest stays unchanged.
    mask_id: the [MASK] id.
    replacement_ids: int [k], the ids random replacements are drawn from.

  Returns:
    {'inputs': int32 [n], 'targets': int32 [n] (= tokens), 'mlm_weights':
    float32 [n] (1.0 at the chosen positions)}.
  """
  tokens = np.asarray(tokens, dtype=np.int32)
  n = len(tokens)
  inputs = tokens.copy()
  weights = np.zeros(n, dtype=np.float32)
  if n:
    num = min(n, max(1, int(round(mask_rate * n))))
    chosen = np.sort(rng.permutation(n)[:num])
    u = rng.random(num)
    to_mask = u < mask_token_fraction
    to_random = (u >= mask_token_fraction) & (u < mask_token_fraction + random_token_fraction)
    inputs[chosen[to_mask]] = mask_id
    picks = rng.integers(0, len(replacement_ids), size=int(to_random.sum()))
    inputs[chosen[to_random]] = replacement_ids[picks]
    weights[chosen] = 1.0
  return {"inputs": inputs, "targets": tokens, "mlm_weights": weights}


class MaskedLanguageModeling(base.Objective):
  """BERT's masked language modelling corruption (80% [MASK] / 10% random / 10% kept).

  Args:
    mask_rate: fraction of tokens chosen for prediction (BERT: 0.15).
    mask_token_fraction: of the chosen tokens, the fraction replaced by [MASK] (0.8).
    random_token_fraction: the fraction replaced by a random real token (0.1).
    mask_id: the [MASK] id; None means `vocab_size - 1`, the first sentinel
      `<extra_id_0>` of a T5-style vocabulary.
    num_reserved_ids: the top ids of the vocabulary that are not text (T5's
      100 extra ids); random replacements are drawn below them.
    whole_examples: mask each example of the task (truncated to the length)
      instead of fixed-length chunks of the concatenated stream.
  """

  name = "mlm"

  def __init__(self, mask_rate: float = 0.15, mask_token_fraction: float = 0.8,
               random_token_fraction: float = 0.1, mask_id: int | None = None,
               num_reserved_ids: int = 100, whole_examples: bool = False):
    if not 0.0 < mask_rate < 1.0:
      raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}")
    if (mask_token_fraction < 0.0 or random_token_fraction < 0.0
        or mask_token_fraction + random_token_fraction > 1.0):
      raise ValueError(f"mask_token_fraction ({mask_token_fraction}) and random_token_fraction "
                       f"({random_token_fraction}) must be >= 0 with a sum <= 1")
    if num_reserved_ids < 0:
      raise ValueError(f"num_reserved_ids must be >= 0, got {num_reserved_ids}")
    self.mask_rate = mask_rate
    self.mask_token_fraction = mask_token_fraction
    self.random_token_fraction = random_token_fraction
    self.mask_id = mask_id
    self.num_reserved_ids = num_reserved_ids
    self.whole_examples = whole_examples
    self._max_length: int | None = None  # Whole examples: truncated to this (chunk_lengths).

  def raw_length(self, feature_lengths: Mapping[str, int]) -> int:
    if "inputs" not in feature_lengths:
      raise ValueError(f"the {self.name} objective needs TASK_FEATURE_LENGTHS['inputs'] "
                       f"(the encoder's sequence length); got {dict(feature_lengths)}")
    length = int(feature_lengths["inputs"])
    if length < 2:
      raise ValueError(f"TASK_FEATURE_LENGTHS['inputs']={length} is too short for masked "
                       "language modelling (at least 2 tokens)")
    return length

  def chunk_lengths(self, feature_lengths: Mapping[str, int]) -> tuple[int, ...] | None:
    """(length,), or None (whole examples, then truncated to length in `transform`)."""
    length = self.raw_length(feature_lengths)
    if not self.whole_examples:
      return (length,)
    self._max_length = length
    return None

  def mask_token_id(self, vocab_size: int) -> int:
    """The [MASK] id for a vocabulary of `vocab_size` ids."""
    return int(vocab_size - 1 if self.mask_id is None else self.mask_id)

  def transform(self, tokens: np.ndarray, rng: np.random.Generator, *, vocab_size: int,
                eos_id: int) -> dict[str, np.ndarray]:
    """tokens: int [n] -> {'inputs' int32 [n], 'targets' int32 [n], 'mlm_weights' float32 [n]}
    (n at most the length `chunk_lengths` was given, with whole examples)."""
    if self.whole_examples and self._max_length is not None:
      tokens = tokens[:self._max_length]
    replacement_ids = (_replacement_ids(int(vocab_size), int(eos_id), self.num_reserved_ids)
                       if self.random_token_fraction > 0 else np.zeros(1, np.int32))
    return mask_tokens(tokens, rng, mask_rate=self.mask_rate,
                       mask_token_fraction=self.mask_token_fraction,
                       random_token_fraction=self.random_token_fraction,
                       mask_id=self.mask_token_id(vocab_size), replacement_ids=replacement_ids)

  def example_stats(self, raw: np.ndarray, features: Mapping[str, np.ndarray]) -> dict[str, float]:
    """{'original_tokens': n, 'masked_tokens': positions chosen for prediction}."""
    return {"original_tokens": len(raw),
            "masked_tokens": int(np.sum(np.asarray(features["mlm_weights"]) > 0))}

"""The interface every objective implements.

An objective turns one example of token ids into the `inputs` / `targets`
of a text-to-text model. It runs in NumPy inside the data pipeline, with a
`numpy.random.Generator` seeded by (seed, example index), so a resumed run
replays exactly the same examples. Objectives are selected by gin; the
trainer never branches on them.
"""
from __future__ import annotations

import abc
from collections.abc import Mapping

import numpy as np


class Objective(abc.ABC):
  """Turns token sequences into model features."""

  #: Name of the source feature read by the objective (`targets` for plain text tasks).
  source_feature: str = "targets"

  @abc.abstractmethod
  def raw_length(self, feature_lengths: Mapping[str, int]) -> int | None:
    """Number of source tokens that make one example, or None to use whole examples.

    Raises ValueError when `feature_lengths` cannot hold the objective's output.
    """

  def setup(self, vocabulary) -> None:
    """Called once with the task's (seqio) vocabulary before the first transform.

    Objectives that add tokens written as text (UL2's paradigm tokens)
    tokenize them here; the default does nothing.
    """
    del vocabulary

  def extra_token_names(self, vocab_size: int) -> dict[int, str]:
    """Token ids >= vocab_size that `transform` emits, with their names (default none).

    The model's embedding table must cover them (`padded_vocab_size(extra_tokens=...)`).
    """
    del vocab_size
    return {}

  @abc.abstractmethod
  def transform(self, tokens: np.ndarray, rng: np.random.Generator, *, vocab_size: int,
                eos_id: int) -> dict[str, np.ndarray]:
    """tokens: int32 [n] -> {'inputs': int32 [..], 'targets': int32 [..]} with EOS appended."""

  #: The objective's name in logs and `inspect_data` rows.
  name: str = "objective"

  def example_stats(self, raw: np.ndarray, features: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-example counts that `inspect_data` sums over a sample.

    Returns counts (not ratios) so that sums over examples give exact
    ratios: e.g. `original_tokens`, `noise_tokens`, `noise_spans`.
    """
    del features
    return {"original_tokens": len(raw)}

  def row_name(self, features: Mapping[str, np.ndarray]) -> str:
    """The `inspect_data` row an example counts in: the objective, or its denoiser in a mixture."""
    del features
    return self.name

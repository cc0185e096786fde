"""The interface every objective implements.

An objective turns one example of token ids into the `inputs` / `targets`
of a text-to-text model. It runs in NumPy inside the data pipeline, with a
`numpy.random.Generator` seeded by (seed, example index), so a resumed run
replays exactly the same examples. Objectives are selected by gin; the
trainer never branches on them.

Chunks: the feeds concatenate the task's text and cut it into chunks of the
lengths `chunk_lengths` gives, a cycle repeated over the stream (one length
for most objectives; UL2 gives each denoiser its own), and transform chunk
i with `transform_chunk(tokens, i mod len(cycle), ...)`, so that every
token of the corpus is in exactly one example per epoch.
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

  def chunk_lengths(self, feature_lengths: Mapping[str, int]) -> tuple[int, ...] | None:
    """One cycle of chunk lengths, or None to use whole examples.

    The feeds cut the concatenated token stream into chunks of lengths
    cycle[0], cycle[1], ..., cycle[-1], cycle[0], ... and transform chunk i
    with `transform_chunk(tokens, slot=i mod len(cycle))`. Default:
    `(raw_length,)`. Raises ValueError as `raw_length` does.
    """
    raw = self.raw_length(feature_lengths)
    return None if raw is None else (raw,)

  def transform_chunk(self, tokens: np.ndarray, slot: int, rng: np.random.Generator, *,
                      vocab_size: int, eos_id: int) -> dict[str, np.ndarray]:
    """`transform` of a chunk cut at position `slot` of the `chunk_lengths` cycle (0 for
    whole examples). The default ignores the slot."""
    del slot
    return self.transform(tokens, rng, vocab_size=vocab_size, eos_id=eos_id)

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

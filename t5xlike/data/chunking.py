"""Random access to fixed-length chunks of a concatenated token stream.

Pretraining objectives read text as T5 does (`reduce_concat_tokens` +
`split_tokens`): the token feature of successive examples is concatenated
and cut into chunks of the objective's raw length. `ChunkedSource` gives
chunk `i` directly from the per-example token lengths (cumulative offsets +
binary search), so the pipeline can shuffle chunks globally by index.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # Types only: chunking itself imports no TensorFlow or seqio.
  from t5xlike.data.sources import RandomAccessSource


class ChunkedSource:
  """Chunk `i` = tokens [i * length, (i + 1) * length) of the concatenated `feature`.

  Args:
    source: random access to examples (`sources.RandomAccessSource`).
    feature: the token feature to concatenate (e.g. 'targets').
    length: tokens per chunk; the last chunk holds the remainder (shorter).
  """

  def __init__(self, source: RandomAccessSource, feature: str, length: int):
    if length <= 0:
      raise ValueError(f"chunk length must be positive, got {length}")
    self.source = source
    self.feature = feature
    self.length = int(length)
    lengths = np.asarray(source.token_lengths(feature), dtype=np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(lengths)])  # [num_examples + 1]
    self.total_tokens = int(self.offsets[-1])
    if self.total_tokens == 0:
      raise ValueError(f"{source.name} has no {feature!r} tokens")

  def __len__(self) -> int:
    return -(-self.total_tokens // self.length)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """{feature: int32 [length]} (the last chunk may be shorter)."""
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"chunk {index} out of range [0, {len(self)})")
    start = index * self.length
    end = min(start + self.length, self.total_tokens)
    first = int(np.searchsorted(self.offsets, start, side="right")) - 1
    last = int(np.searchsorted(self.offsets, end, side="left"))
    pieces = []
    for example in range(first, last):
      tokens = np.asarray(self.source[example][self.feature])
      lo = max(start - self.offsets[example], 0)
      hi = min(end - self.offsets[example], len(tokens))
      pieces.append(tokens[lo:hi])
    return {self.feature: np.concatenate(pieces).astype(np.int32)}

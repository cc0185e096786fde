"""Random access to the chunks of a concatenated token stream.

Pretraining objectives read text as T5 does (`reduce_concat_tokens` +
`split_tokens`): the token feature of successive examples is concatenated
and cut into chunks of the objective's raw length. An objective may ask for
a cycle of lengths instead (`Objective.chunk_lengths`: UL2 gives each
denoiser its own), repeated over the stream, so that every token is in
exactly one chunk whatever the lengths. `ChunkedSource` gives chunk `i`
directly from the per-example token lengths (cumulative offsets + binary
search), so the pipeline can shuffle chunks globally by index.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # Types only: chunking itself imports no TensorFlow or seqio.
  from t5xlike.data.sources import RandomAccessSource


class ChunkedSource:
  """Chunk `i` of the concatenated `feature`, cut in lengths cycle[0], cycle[1], ...

  With a cycle of K lengths summing to T tokens, chunk i = c K + s (slot s of
  cycle c) holds tokens [c T + cycle[0] + ... + cycle[s - 1], + cycle[s]).

  Args:
    source: random access to examples (`sources.RandomAccessSource`).
    feature: the token feature to concatenate (e.g. 'targets').
    lengths: tokens per chunk, one length or a cycle of them; the last chunk
      holds the remainder (shorter).
  """

  def __init__(self, source: RandomAccessSource, feature: str, lengths: int | Sequence[int]):
    cycle = (int(lengths),) if isinstance(lengths, (int, np.integer)) else tuple(
        int(n) for n in lengths)
    if not cycle or min(cycle) <= 0:
      raise ValueError(f"chunk lengths must be positive, got {cycle}")
    self.source = source
    self.feature = feature
    self.lengths = cycle
    # Offsets of the slots in a cycle [K + 1]; the last is the cycle's token count.
    self.cycle_offsets = np.concatenate([[0], np.cumsum(cycle)]).astype(np.int64)
    example_lengths = np.asarray(source.token_lengths(feature), dtype=np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(example_lengths)])  # [num_examples + 1]
    self.total_tokens = int(self.offsets[-1])
    if self.total_tokens == 0:
      raise ValueError(f"{source.name} has no {feature!r} tokens")

  def __len__(self) -> int:
    cycles, rest = divmod(self.total_tokens, int(self.cycle_offsets[-1]))
    # The chunks of the last, partial cycle: the slots that start before its end.
    partial = int(np.searchsorted(self.cycle_offsets[:-1], rest, side="left"))
    return cycles * len(self.lengths) + partial

  def slot(self, index: int) -> int:
    """The position of chunk `index` in the cycle of lengths."""
    return int(index) % len(self.lengths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """{feature: int32 [lengths[slot(index)]]} (the last chunk may be shorter)."""
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"chunk {index} out of range [0, {len(self)})")
    cycle, slot = divmod(index, len(self.lengths))
    start = cycle * int(self.cycle_offsets[-1]) + int(self.cycle_offsets[slot])
    end = min(start + self.lengths[slot], self.total_tokens)
    first = int(np.searchsorted(self.offsets, start, side="right")) - 1
    last = int(np.searchsorted(self.offsets, end, side="left"))
    pieces = []
    for example in range(first, last):
      tokens = np.asarray(self.source[example][self.feature])
      lo = max(start - self.offsets[example], 0)
      hi = min(end - self.offsets[example], len(tokens))
      pieces.append(tokens[lo:hi])
    return {self.feature: np.concatenate(pieces).astype(np.int32)}

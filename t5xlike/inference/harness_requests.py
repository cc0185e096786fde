"""How lm-evaluation-harness requests become model examples (no lm_eval import).

A harness request is text: (context, continuation) to score, a whole text to
score (rolling), or a context to continue. `RequestEncoder` tokenizes it with
the model's VOCABULARY and lays it out as `Predictor` examples
(`{"inputs", "targets"}` int32 ids) for one of three layouts:

- `encoder_decoder`: the context is the encoder input, `encode(context) + EOS`
  (what `infer` makes of an `inputs` text), the continuation the decoder's
  targets, `encode(continuation)` without EOS (text may follow it).
- `prefix` (decoder-only, prefix LM): the same ids, the context as the prefix
  (read bidirectionally, as `infer` and the prefix-LM objective do).
- `causal` (decoder-only, causal LM): one row of targets, context then
  continuation (`encode(context + continuation)` split where `encode(context)`
  ends, as the harness does); only the continuation's tokens are summed.

Contexts are cut from the left to fit TASK_FEATURE_LENGTHS (the harness's
convention: the end of the context is kept); a continuation longer than
`targets` cannot be scored and raises ValueError. Trailing whitespace of a
context moves to the continuation (the harness's `TemplateLM` rule).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LAYOUTS = ("encoder_decoder", "prefix", "causal")


@dataclasses.dataclass(frozen=True)
class Scoring:
  """One scoring row: the `Predictor` example and how many of its last target
  tokens are the continuation (their log-likelihoods are summed)."""
  example: dict[str, np.ndarray]
  scored: int


@dataclasses.dataclass(frozen=True)
class RequestEncoder:
  """Text requests -> examples of one model.

  Attributes:
    vocabulary: the model's seqio vocabulary (`encode`, `decode`, `eos_id`).
    feature_lengths: TASK_FEATURE_LENGTHS: 'inputs' (context ids + EOS; not used by
      `causal`) and 'targets' (continuation ids; `causal`: context + continuation).
    layout: one of LAYOUTS.
  """
  vocabulary: Any
  feature_lengths: Mapping[str, int]
  layout: str

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
    needed = ("targets",) if self.layout == "causal" else ("inputs", "targets")
    missing = [name for name in needed if name not in self.feature_lengths]
    if missing:
      raise ValueError(f"the {self.layout} layout needs TASK_FEATURE_LENGTHS {missing}")

  @property
  def eos_id(self) -> int:
    return int(self.vocabulary.eos_id)

  def encode(self, text: str) -> list[int]:
    """The ids of `text` (no EOS)."""
    return [int(i) for i in self.vocabulary.encode(text)] if text else []

  def decode(self, ids: Sequence[int]) -> str:
    """The text of generated ids, up to (not including) the first EOS."""
    ids = list(ids)
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return str(self.vocabulary.decode(ids))

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids); the context's trailing whitespace joins the
    continuation; `causal` splits the ids of the whole text."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context = stripped
    if self.layout != "causal":
      return self.encode(context), self.encode(continuation)
    whole, head = self.encode(context + continuation), self.encode(context)
    return whole[:len(head)], whole[len(head):]

  def scoring(self, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> Scoring:
    """The row that scores `continuation_ids` after `context_ids`; ValueError when the
    continuation is longer than TASK_FEATURE_LENGTHS['targets']."""
    limit = self.feature_lengths["targets"]
    continuation = list(continuation_ids)
    if len(continuation) > limit:
      raise ValueError(f"a continuation of {len(continuation)} tokens is longer than "
                       f"TASK_FEATURE_LENGTHS['targets']={limit}")
    if self.layout == "causal":
      room = limit - len(continuation)
      context = list(context_ids)[max(len(context_ids) - room, 0):] if room > 0 else []
      return Scoring({"targets": np.asarray(context + continuation, np.int32)},
                     len(continuation))
    return Scoring({"inputs": self.prompt(context_ids),
                    "targets": np.asarray(continuation, np.int32)}, len(continuation))

  def prompt(self, context_ids: Sequence[int]) -> np.ndarray:
    """The encoder input / prefix of a context: its last 'inputs' - 1 ids, then EOS."""
    if self.layout == "causal":
      raise ValueError("a causal layout has no prompt: decoder-only generation reads the "
                       "context as a prefix (layout 'prefix')")
    room = self.feature_lengths["inputs"] - 1
    kept = list(context_ids)[max(len(context_ids) - room, 0):] if room > 0 else []
    return np.asarray(kept + [self.eos_id], np.int32)

  def truncated(self, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> bool:
    """Whether `scoring` / `prompt` drop ids from the left of this context."""
    if self.layout == "causal":
      return len(context_ids) + len(continuation_ids) > self.feature_lengths["targets"]
    return len(context_ids) + 1 > self.feature_lengths["inputs"]


def cut_at(text: str, until: Sequence[str]) -> str:
  """`text` up to the first occurrence of any of the `until` strings (the harness's
  stop sequences; empty strings ignored)."""
  cut = len(text)
  for stop in until:
    if stop:
      found = text.find(stop)
      if found != -1:
        cut = min(cut, found)
  return text[:cut]

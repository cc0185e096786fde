"""UL2 mode switching at fine-tuning and inference time (Tay et al. 2022, "UL2:
Unifying Language Learning Paradigms", §3.1.3 "Mode Switching").

UL2 pretrains each denoiser with its paradigm token first in the inputs
(`objectives.ul2`: `[NLU]` for the R-denoisers, `[NLG]` for X, `[S2S]` for
the S-denoiser); a downstream task is then fine-tuned and queried with the
token of the mode that suits it (§3.1.3: "switch modes" by prepending the
paradigm token at fine-tuning and few-shot inference). Here:

- fine-tuning: `MODE_TOKEN` (every task) and `TASK_MODE_TOKENS` (a task name
  -> its token, overriding MODE_TOKEN; None: no token for that task) in
  `runs/finetune.gin`; the feeds (training and evaluation) and the task
  evaluator prepend it to each example's `inputs` (the prefix of a prefix
  LM) before EOS trimming, so it counts against TASK_FEATURE_LENGTHS['inputs']
  as in pretraining;
- inference: the JSONL field `"mode": "[S2S]"` of a request, else
  `MODE_TOKEN` of `runs/infer.gin` (`"mode": null` asks for none), for
  `inputs` text and `input_ids` alike; task-based inference uses the task's
  token as training does.

The ids are UL2's (`ul2.paradigm_token_ids`, one source of truth): with
`paradigm_tokens='text'` the string tokenized by the vocabulary (5 pieces
with the embedded vocabulary), with `'special'` one id after the vocabulary
per paradigm in the table's order (8,100 / 8,101 / 8,102 here), which the
model's embedding must cover (`t5.padded_vocab_size.extra_tokens`).

Exactly once: the token's ids are prepended unless the inputs already begin
with them (a request whose text starts with "[S2S] ..." already carries the
mode: it is not doubled). Other paradigm tokens later in the inputs are
left alone. Layout, `[S2S]` as text (ids 832 505 221 505 418):

  inputs "Count the words: a b" -> [832 505 221 505 418 | 6115 4 1925 25 6 490 | 1]
  inputs "[S2S] Count the words: a b" -> the same ids (not prepended again)

A token that is not a paradigm of the table, or that the vocabulary cannot
hold (text with an unknown piece, a special id beyond the model's
embedding), is a ConfigError: one line, exit code 2, nothing written.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from t5xlike import errors
from t5xlike.objectives import ul2

log = logging.getLogger(__name__)


def prepend_once(inputs: np.ndarray, token: np.ndarray) -> np.ndarray:
  """int32 [k + n] `token` + `inputs`, or `inputs` (int32) when it already starts with `token`."""
  inputs = np.asarray(inputs, np.int32)
  token = np.asarray(token, np.int32)
  if len(inputs) >= len(token) and np.array_equal(inputs[:len(token)], token):
    return inputs
  return np.concatenate([token, inputs]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ModeSwitching:
  """Which paradigm token each task and request gets, and its ids.

  Attributes:
    default: MODE_TOKEN, the token of every task (and of inference requests without a
      `mode` field); None: none.
    per_task: TASK_MODE_TOKENS, task name -> token (None: none), over `default`.
    paradigm_tokens: how pretraining wrote the tokens: 'text' or 'special' (the
      `paradigm_tokens` of `ul2.UL2`).
    paradigms: the distinct paradigm strings of the pretraining's denoiser table, in
      its order (the 'special' ids follow it); default UL2's `[NLU]`, `[NLG]`, `[S2S]`.
  """
  default: str | None = None
  per_task: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
  paradigm_tokens: str = "text"
  paradigms: Sequence[str] = ul2.PARADIGM_TOKENS
  #: (id of the vocabulary, mode) -> checked ids (examples ask once each).
  _ids: dict[tuple[int, str], np.ndarray] = dataclasses.field(
      default_factory=dict, init=False, repr=False, compare=False)

  def __post_init__(self):
    if self.paradigm_tokens not in ul2.PARADIGM_TOKEN_MODES:
      raise errors.ConfigError(f"paradigm_tokens must be one of {ul2.PARADIGM_TOKEN_MODES}, "
                               f"got {self.paradigm_tokens!r}")
    if not isinstance(self.per_task, Mapping):
      raise errors.ConfigError(f"TASK_MODE_TOKENS must be a dict of task name -> mode token, "
                               f"got {self.per_task!r}")
    self.check_mode(self.default, "MODE_TOKEN")
    for task, mode in self.per_task.items():
      self.check_mode(mode, f"TASK_MODE_TOKENS[{task!r}]")

  def check_mode(self, mode: Any, where: str) -> None:
    """ConfigError unless `mode` is None or a paradigm of the table (`where` names it)."""
    if mode is not None and (not isinstance(mode, str) or mode not in self.paradigms):
      raise errors.ConfigError(f"{where}={mode!r} is not a UL2 mode token: use one of "
                               f"{', '.join(self.paradigms)} (or None)")

  @property
  def active(self) -> bool:
    """Whether any task gets a token."""
    return self.default is not None or any(m is not None for m in self.per_task.values())

  def mode_of(self, task_name: str | None) -> str | None:
    """The token of a task (`per_task`, else `default`)."""
    if task_name is not None and task_name in self.per_task:
      return self.per_task[task_name]
    return self.default

  def token_ids(self, mode: str, vocabulary, model_vocab_size: int | None = None) -> np.ndarray:
    """int32 [k]: the ids `mode` stands for (`ul2.paradigm_token_ids`). ConfigError when the
    vocabulary lacks it: text with an unknown piece (or that does not decode back), or a
    special id at or beyond `model_vocab_size` (the model's embedding rows)."""
    key = (id(vocabulary), mode)
    if key in self._ids:
      ids = self._ids[key]
      if model_vocab_size is None or int(ids.max()) < model_vocab_size:
        return ids
    self.check_mode(mode, "mode")
    if vocabulary is None:
      raise errors.ConfigError(f"mode token {mode!r} needs the model's VOCABULARY (the model "
                               "has none)")
    ids = ul2.paradigm_token_ids(list(self.paradigms), vocabulary, self.paradigm_tokens)[mode]
    if self.paradigm_tokens == "text":
      unk = getattr(vocabulary, "unk_id", None)
      if not len(ids) or (unk is not None and unk in ids) or vocabulary.decode(
          [int(i) for i in ids]) != mode:
        raise errors.ConfigError(f"the vocabulary lacks the mode token {mode!r}: it encodes "
                                 f"to {ids.tolist()}, which does not decode back to it")
    elif model_vocab_size is not None and int(ids.max()) >= model_vocab_size:
      raise errors.ConfigError(
          f"the mode token {mode!r} is id {int(ids.max())} but the model has "
          f"{model_vocab_size} embeddings (bind t5.padded_vocab_size.extra_tokens = "
          f"{len(self.paradigms)}, as for pretraining with paradigm_tokens='special')")
    self._ids[key] = ids
    return ids

  def check(self, vocabulary, model_vocab_size: int | None = None) -> None:
    """Every configured token resolves (ConfigError as `token_ids`)."""
    for mode in {self.default, *self.per_task.values()} - {None}:
      self.token_ids(str(mode), vocabulary, model_vocab_size)

  def apply(self, example: Mapping[str, np.ndarray], task_name: str | None,
            vocabulary) -> dict[str, np.ndarray]:
    """`example` with its task's token prepended to `inputs` once (unchanged without a
    token or without `inputs`)."""
    out = dict(example)
    mode = self.mode_of(task_name)
    if mode is not None and "inputs" in out:
      out["inputs"] = prepend_once(out["inputs"], self.token_ids(mode, vocabulary))
    return out

  def warn_unknown_tasks(self, task_names: Sequence[str]) -> None:
    """Logs the TASK_MODE_TOKENS names that are not among `task_names` (a typo?)."""
    unknown = sorted(set(self.per_task) - set(task_names))
    if unknown:
      log.warning("TASK_MODE_TOKENS names %s, not tasks of this run (%s)", unknown,
                  ", ".join(task_names))

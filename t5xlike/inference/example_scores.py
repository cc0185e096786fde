"""Per-example scores of a task's examples under a checkpoint, for data selection.

Every score comes from `predictor.Predictor` (batched, padded to one
compiled shape, the parameters laid out on the mesh of MESH_SHAPE), the
code behind `python -m t5xlike.infer --mode=score`:

  loss        the mean negative log-likelihood (nats per target token) of an
              example's targets given its inputs: -score / len(token_scores)
              of `Predictor.score`; perplexity = exp(loss). NaN for an
              example without a target token.
  loss_alone  the same with the inputs emptied: what an empty input becomes
              after the task's preprocessing ([EOS] when the task appends EOS
              to its inputs, else no token).
  ifd         loss / loss_alone: the Instruction-Following Difficulty of Li et
              al., "From Quantity to Quality: Boosting LLM Performance with
              Self-Guided Data Selection for Instruction Tuning" (NAACL 2024,
              §2.3): the conditioned answer score s(A|Q) over the direct answer
              score s(A), both averaged cross entropies over the answer tokens.
  pooled      `Predictor.pooled_states`: the final hidden states (the T5
              encoder's, a decoder-only model's last layer) averaged over the
              example's tokens, float32 [n, embed].

No TensorFlow here: the examples are token ids (`data.task_examples`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from t5xlike.inference.predictor import Predictor

Example = Mapping[str, np.ndarray]


@dataclasses.dataclass
class TargetLosses:
  """The targets' likelihood per example.

  Attributes:
    loss: float64 [n], mean negative log-likelihood per target token (nats); NaN
      where the example has no target token.
    tokens: int64 [n], the target tokens scored (after truncation to the
      'targets' length).
    log_likelihood: float64 [n], the summed natural-log likelihood (`infer`'s `score`).
  """
  loss: np.ndarray
  tokens: np.ndarray
  log_likelihood: np.ndarray

  @property
  def perplexity(self) -> np.ndarray:
    """float64 [n]: exp(loss)."""
    return np.exp(self.loss)


def target_losses(predictor: Predictor, examples: Sequence[Example]) -> TargetLosses:
  """`Predictor.score` of every example, as losses per target token."""
  scores = predictor.score(examples)
  total = np.array([s.total for s in scores], np.float64)
  tokens = np.array([len(s.token_scores) for s in scores], np.int64)
  with np.errstate(invalid="ignore", divide="ignore"):
    loss = np.where(tokens > 0, -total / np.maximum(tokens, 1), np.nan)
  return TargetLosses(loss=loss, tokens=tokens, log_likelihood=total)


def without_inputs(examples: Sequence[Example], eos_id: int | None) -> list[dict[str, np.ndarray]]:
  """The examples with their inputs replaced by what an empty input becomes: [eos_id],
  or no token when `eos_id` is None (a task that appends no EOS to its inputs)."""
  empty = np.array([] if eos_id is None else [eos_id], np.int32)
  return [{**example, "inputs": empty} for example in examples]


def instruction_following_difficulty(conditioned: np.ndarray, alone: np.ndarray) -> np.ndarray:
  """float64 [n]: IFD = loss(targets | inputs) / loss(targets alone); NaN where either
  is NaN or the loss alone is 0 (an undefined ratio)."""
  with np.errstate(invalid="ignore", divide="ignore"):
    ratio = np.asarray(conditioned, np.float64) / np.asarray(alone, np.float64)
  return np.where(np.isfinite(ratio), ratio, np.nan)


def pooled(predictor: Predictor, examples: Sequence[Example]) -> np.ndarray:
  """float32 [n, embed]: `Predictor.pooled_states` (the model's `pooled_states`)."""
  return predictor.pooled_states(examples)

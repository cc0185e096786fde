"""Metric functions for seqio tasks, on maintained libraries.

seqio's contract: a *predict* metric is `fn(targets, predictions) -> {name:
value}` over the postprocessed targets and predictions of a whole split (in
the same order); a *score* metric is `fn(targets, scores)`, where `scores` are
the summed log-likelihoods of the targets. seqio tells them apart by the
names of the positional arguments, so keep them.

Every value is in percent (0-100, as T5 reports GLUE and SuperGLUE), except
`mean_log_likelihood` (nats per example).

  accuracy             sklearn.metrics.accuracy_score x 100 (labels or strings
                       compared as given).
  sequence_accuracy    exact match of the strings after `str.strip`, x 100.
  f1_binary            sklearn.metrics.f1_score (positive class 1) x 100,
                       invalid predictions counted wrong.
  mcc                  sklearn.metrics.matthews_corrcoef x 100.
  bleu                 sacrebleu.corpus_bleu, T5's settings (tokenize='intl',
                       smooth_method='exp'); one or several references.
  rouge                rouge_score: rouge1, rouge2, rougeLsum F-measure, stemmed,
                       mean over examples, x 100.
  mean_log_likelihood  mean of the scores (score metric).

Core module: no TensorFlow or seqio here (the evaluation loop may run
without them). scikit-learn and rouge_score (0.7 s and 0.85 s to import) are
imported on first use: every task module imports this one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import sacrebleu

ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
  """{'accuracy': percent of predictions equal to their target}."""
  from sklearn import metrics  # noqa: PLC0415  (heavy, 0.7 s: only these metrics need it)
  return {"accuracy": 100.0 * float(metrics.accuracy_score(list(targets), list(predictions)))}


def sequence_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """{'sequence_accuracy': percent of predictions equal to their target after strip()}."""
  from sklearn import metrics  # noqa: PLC0415  (heavy, 0.7 s: only these metrics need it)
  score = metrics.accuracy_score([str(t).strip() for t in targets],
                                 [str(p).strip() for p in predictions])
  return {"sequence_accuracy": 100.0 * float(score)}


def f1_binary(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """{'f1': percent F1 of the positive class 1 (GLUE MRPC, QQP); targets are 0/1}.

  A prediction that is neither 0 nor 1 (e.g. -1, text that is no label)
  counts as the wrong class, as in T5's `f1_score_with_invalid`: a false
  negative when the target is 1, a false positive when it is 0.
  """
  from sklearn import metrics  # noqa: PLC0415  (heavy, 0.7 s: only these metrics need it)
  target_labels, predicted_labels = np.asarray(targets), np.asarray(predictions)
  predicted_labels = np.where(np.isin(predicted_labels, (0, 1)), predicted_labels,
                              1 - target_labels)
  score = metrics.f1_score(target_labels, predicted_labels, pos_label=1, average="binary",
                           zero_division=0.0)
  return {"f1": 100.0 * float(score)}


def mcc(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """{'matthews_corrcoef': percent Matthews correlation (GLUE CoLA)}."""
  from sklearn import metrics  # noqa: PLC0415  (heavy, 0.7 s: only these metrics need it)
  return {"matthews_corrcoef":
          100.0 * float(metrics.matthews_corrcoef(list(targets), list(predictions)))}


def _references(targets: Sequence[str | Sequence[str]]) -> list[list[str]]:
  """sacrebleu's reference streams: [stream][example] from [example] or [example][ref]."""
  strings = [t for t in targets if isinstance(t, str)]
  if len(strings) == len(targets):
    return [strings]
  counts = {len(t) for t in targets}
  if len(counts) != 1:
    raise ValueError(f"bleu: every example needs the same number of references, got {counts}")
  return [list(stream) for stream in zip(*targets)]


def bleu(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """{'bleu': corpus BLEU in percent (sacrebleu, as T5 computes it)}.

  `targets`: one reference string per example, or a list of references per
  example (the same number for every example).
  """
  result = sacrebleu.corpus_bleu(list(predictions), _references(targets), smooth_method="exp",
                                 smooth_value=0.0, force=False, lowercase=False, tokenize="intl",
                                 use_effective_order=False)
  return {"bleu": float(result.score)}


def _summary_lines(text: str) -> str:
  """One sentence per line, as rougeLsum expects (T5 splits at ' . ')."""
  return text.replace(" . ", " .\n")


def rouge(targets: Sequence[str], predictions: Sequence[str],
          rouge_types: Sequence[str] = ROUGE_TYPES) -> dict[str, float]:
  """{'rouge1', 'rouge2', 'rougeLsum'}: mean F-measure over examples, in percent.

  rouge_score's RougeScorer with the Porter stemmer, each target scored
  against its prediction.
  """
  from rouge_score import rouge_scorer  # noqa: PLC0415  (heavy, 0.85 s: only rouge needs it)
  if len(targets) != len(predictions):
    raise ValueError(f"rouge: {len(targets)} targets but {len(predictions)} predictions")
  scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=True)
  totals = dict.fromkeys(rouge_types, 0.0)
  for target, prediction in zip(targets, predictions):
    scores = scorer.score(_summary_lines(target), _summary_lines(prediction))
    for name in rouge_types:
      totals[name] += scores[name].fmeasure
  count = max(len(targets), 1)
  return {name: 100.0 * total / count for name, total in totals.items()}


def mean_log_likelihood(targets: Sequence[Any], scores: Sequence[float]) -> dict[str, float]:
  """{'mean_log_likelihood': mean summed log-likelihood of the targets, nats per example}."""
  del targets
  return {"mean_log_likelihood": float(np.mean(np.asarray(scores, np.float64)))}

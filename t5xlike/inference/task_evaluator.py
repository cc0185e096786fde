"""Evaluation with the tasks' seqio metric functions (`python -m t5xlike.eval`, and
evaluation during training: `run_config.EvalConfig.inference_evaluator`).

For each task of a mixture, `InferenceEvaluator` reads the split's examples,
predicts (greedy by default) when the task has prediction metrics
(`metric_fns(targets, predictions)`) and scores the targets when it has
score metrics (`score_metric_fns(targets, scores)`), following seqio's
contract: targets are the decoded target ids and predictions the decoded
generated ids, both through `task.postprocess_fn(text, example=...,
is_target=...)`; a metric function returns `{name: value}` (values may be
seqio `MetricValue`s). Each task adds `loss` (mean negative log-likelihood
per target token, from the scores) when scored. Writes
`<output_dir>/metrics/eval.jsonl` rows `{"step", "task", <metric>: value}`
and `<output_dir>/inference_eval/<task>-<step>.jsonl`, one row per example
in infer's vocabulary of keys (`jsonl_io`): the decoded `inputs` (absent for
a task without inputs) and `targets`, the `prediction` (when the task has
prediction metrics) and the `score` (summed log-likelihood of the targets).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from t5xlike.inference import decoding, jsonl_io
from t5xlike.inference.predictor import Predictor

log = logging.getLogger(__name__)


def _plain_metric(value: Any) -> Any:
  value = getattr(value, "value", value)  # seqio.metrics.Scalar and friends.
  try:
    return float(value)
  except (TypeError, ValueError):
    return value


class InferenceEvaluator:
  """Task metrics of a model on the `split` of each task of a mixture.

  Args:
    mixture_or_task_name: the task or mixture whose tasks are evaluated.
    feature_lengths: TASK_FEATURE_LENGTHS.
    batch_size: examples per compiled call.
    split: the split evaluated (seqio tasks name it 'validation' mostly).
    max_examples: at most this many examples per task (None: all).
    decoding_config: how predictions are decoded (default greedy).
    max_decode_length: default the 'targets' length.
    use_cached_tasks, task_cache_dir: as in training.
    mixture_or_task_module: imported first (registers the tasks).
    first_example: the examples of each task before this one are not used (`max_examples`
      then counts from it): a part of the split another evaluation reports on is skipped.
    mode_switching: each task's UL2 paradigm token first in its inputs, as in training
      (`objectives.mode_switching.ModeSwitching`, MODE_TOKEN / TASK_MODE_TOKENS).
  """

  def __init__(self, mixture_or_task_name: str, feature_lengths: Mapping[str, int],
               batch_size: int = 32, split: str = "validation", max_examples: int | None = None,
               decoding_config: decoding.DecodingConfig | None = None,
               max_decode_length: int | None = None, use_cached_tasks: bool = False,
               task_cache_dir: str | None = None, mixture_or_task_module: str | None = None,
               first_example: int = 0, mode_switching: Any = None):
    # Nothing is read here: gin builds the evaluator with the run's arguments, also when
    # the run never evaluates (EVAL_PERIOD=None). `prepare` reads the tasks.
    self.mixture_or_task_name = mixture_or_task_name
    self.mixture_or_task_module = mixture_or_task_module
    self.feature_lengths = dict(feature_lengths)
    self.batch_size, self.max_decode_length = batch_size, max_decode_length
    self.split, self.max_examples = split, max_examples
    self.decoding_config = decoding_config
    self.use_cached_tasks, self.task_cache_dir = use_cached_tasks, task_cache_dir
    self.first_example = first_example
    self.mode_switching = mode_switching
    self._tasks: list[tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]] | None = None

  @property
  def tasks(self) -> list[tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]]:
    """(seqio task, its examples, their decoded text rows) of each task with metric functions."""
    return self.prepare()

  @property
  def names(self) -> list[str]:
    """The evaluated tasks' names."""
    return [task.name for task, _, _ in self.tasks]

  def prepare(self) -> list[tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]]:
    """Reads the split's examples of every task of the mixture that has metric functions
    (once; a task without any is skipped, logged once). ValueError naming an unknown
    task, module or split."""
    if self._tasks is not None:
      return self._tasks
    # seqio and TensorFlow: imported when a task evaluation runs, so that the rest of
    # inference (and `infer --input`) runs where TensorFlow is not installed.
    from t5xlike.data import task_examples  # noqa: PLC0415
    task_examples.import_module(self.mixture_or_task_module)
    tasks = []
    for task in task_examples.leaf_tasks(self.mixture_or_task_name, self.task_cache_dir):
      if not (task.predict_metric_fns or task.score_metric_fns):
        log.info("evaluation: task %s has no metric functions: skipped", task.name)
        continue
      first = self.first_example
      examples = task_examples.read_split(
          task, self.split, self.feature_lengths, use_cached=self.use_cached_tasks,
          cache_dir=self.task_cache_dir,
          max_examples=None if self.max_examples is None else first + self.max_examples,
          mode_switching=self.mode_switching)
      if first and len(examples) <= first:
        raise ValueError(f"{task.name}/{self.split} has no example after the first {first}")
      examples = examples[first:]
      tasks.append((task, examples, [task_examples.text_row(task, ex) for ex in examples]))
    if not tasks:
      log.info("evaluation: no task of %s has metric functions: nothing to add to the "
               "loss and accuracy", self.mixture_or_task_name)
    self._tasks = tasks
    return tasks

  def evaluate(self, model: Any, params: Any, step: int,
               output_dir: str | epath.Path | None = None,
               show_progress: bool = False) -> dict[str, dict[str, Any]]:
    """{task: {metric: value}}; writes the inference outputs under `output_dir`;
    `show_progress`: each task's predicting and scoring (`t5xlike.progress`; the eval
    command, not evaluations inside training)."""
    if not self.tasks:
      return {}
    eos_id = model.vocabulary.eos_id if model.vocabulary is not None else 1
    predictor = Predictor(model, params, self.feature_lengths, self.batch_size,
                          self.decoding_config, self.max_decode_length, eos_id)
    results = {}
    for task, examples, rows in self.tasks:
      predictor.progress = task.name if show_progress else None
      vocabulary = task.output_features["targets"].vocabulary
      texts = scores = None
      outputs: list[dict[str, Any]] = [dict(row) for row in rows]  # inputs, targets
      speed = {}
      if task.predict_metric_fns:
        texts = [vocabulary.decode(p.ids) for p in predictor.predict(examples)]
        speed["decode_tokens_per_second"] = predictor.last_stats["decode_tokens_per_second"]
        for out, text in zip(outputs, texts):
          out["prediction"] = text
      scores = [s.total for s in predictor.score(examples)]
      for out, score in zip(outputs, scores):
        out["score"] = score
      scored_tokens = predictor.last_stats["scored_tokens"]
      values = task_metrics(task, examples, rows, texts, scores)
      values.update(loss=-sum(scores) / max(scored_tokens, 1), examples=len(examples), **speed)
      results[task.name] = values
      if output_dir is not None:
        jsonl_io.write_jsonl(epath.Path(output_dir) / "inference_eval" /
                               f"{task.name}-{step}.jsonl", outputs)
    return results


def task_metrics(task: Any, examples: Sequence[Mapping[str, Any]],
                 rows: Sequence[Mapping[str, str]], predictions: Sequence[str] | None,
                 scores: Sequence[float] | None) -> dict[str, Any]:
  """A task's metric values (seqio's contract) from decoded predictions and/or scores.

  Targets are the decoded target texts `rows[i]['targets']`; targets and
  predictions go through `task.postprocess_fn(text, example=..., is_target=...)`;
  then `metric_fn(targets, predictions)` for each prediction metric and
  `metric_fn(targets, scores)` for each score metric.

  Args:
    task: the seqio task (its postprocessor and metric functions).
    examples: its examples (token ids), in order.
    rows: their decoded texts (`task_examples.text_row`), in the same order.
    predictions: decoded generated texts (None: no prediction metrics).
    scores: summed target log-likelihoods (None: no score metrics).
  """
  post = lambda text, example, is_target: task.postprocess_fn(text, example=example,
                                                              is_target=is_target)
  targets = [post(row["targets"], ex, True) for ex, row in zip(examples, rows)]
  values: dict[str, Any] = {}
  if predictions is not None:
    processed = [post(text, ex, False) for text, ex in zip(predictions, examples)]
    for metric_fn in task.predict_metric_fns:
      values.update({k: _plain_metric(v) for k, v in metric_fn(targets, processed).items()})
  if scores is not None:
    for metric_fn in task.score_metric_fns:
      values.update({k: _plain_metric(v) for k, v in metric_fn(targets, list(scores)).items()})
  return values



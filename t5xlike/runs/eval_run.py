"""The run that `python -m t5xlike.eval` executes (gin root `eval_run.evaluate`).

Validates CHECKPOINT_PATH, EVAL_OUTPUT_DIR and the tasks first (nothing
written), then evaluates every task of MIXTURE_OR_TASK_NAME that has metric
functions (`inference.task_evaluator.InferenceEvaluator`) and writes
EVAL_OUTPUT_DIR/metrics/eval.jsonl and EVAL_OUTPUT_DIR/inference_eval/<task>-<step>.jsonl.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

from etils import epath

from t5xlike import errors, metrics
from t5xlike.cli import entry
from t5xlike.inference import checkpoint_loading, decoding
from t5xlike.inference.task_evaluator import InferenceEvaluator

log = logging.getLogger(__name__)


def evaluate(*, model: Any, checkpoint_path: str | None, eval_output_dir: str | None,
             mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
             batch_size: int, mixture_or_task_module: str | None = None,
             split: str = "validation", max_examples: int | None = None,
             decoding_config: decoding.DecodingConfig | None = None,
             max_decode_length: int | None = None, use_cached_tasks: bool = False,
             task_cache_dir: str | None = None,
             mesh_shape: Mapping[str, int] | None = None) -> dict[str, dict[str, Any]]:
  """Evaluates CHECKPOINT_PATH on every task of MIXTURE_OR_TASK_NAME (gin root of
  `python -m t5xlike.eval`); writes EVAL_OUTPUT_DIR/metrics/eval.jsonl and
  EVAL_OUTPUT_DIR/inference_eval/<task>-<step>.jsonl. Returns {task: metrics}."""
  # ---- validation: nothing is written before this block has passed. ----
  if not checkpoint_path:  # Checked first: reading the tasks is wasted without it.
    checkpoint_loading.load_checkpoint(model, checkpoint_path, task_feature_lengths, mesh_shape)
  if not eval_output_dir:
    raise errors.ConfigError("EVAL_OUTPUT_DIR is not set (pass --gin.EVAL_OUTPUT_DIR=DIR)")
  errors.require_int("BATCH_SIZE", batch_size)
  try:
    evaluator = InferenceEvaluator(
        mixture_or_task_name, task_feature_lengths, batch_size, split=split,
        max_examples=max_examples, decoding_config=decoding_config,
        max_decode_length=max_decode_length, use_cached_tasks=use_cached_tasks,
        task_cache_dir=task_cache_dir, mixture_or_task_module=mixture_or_task_module)
  except ValueError as error:
    raise errors.ConfigError(errors.one_line(error)) from None
  model, params, step = checkpoint_loading.load_model_checkpoint(model, checkpoint_path,
                                                       task_feature_lengths, mesh_shape)

  # ---- the run. ----
  entry.mark_run_started()
  results = evaluator.evaluate(model, params, step, eval_output_dir)
  writer = metrics.MetricsWriter(eval_output_dir)
  try:
    for task, values in results.items():
      writer.write_eval(step, task, values)
      log.info("eval step %d %s | %s", step, task, " | ".join(
          f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float) and math.isfinite(v)))
  finally:
    writer.close()
  log.info("wrote %s", epath.Path(eval_output_dir) / "metrics" / "eval.jsonl")
  return results

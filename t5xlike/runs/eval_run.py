"""The run that `python -m t5xlike.eval` executes (gin root `eval_run.evaluate`).

`evaluate(...)` is `execute(plan_evaluation(...))`: the plan checks
CHECKPOINT_PATH, EVAL_OUTPUT_DIR and the tasks and loads the parameters
(nothing written); `execute` evaluates every task of MIXTURE_OR_TASK_NAME
that has metric functions (`inference.task_evaluator.InferenceEvaluator`) and
writes EVAL_OUTPUT_DIR/metrics/eval.jsonl and
EVAL_OUTPUT_DIR/inference_eval/<task>-<step>.jsonl.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import gin
from etils import epath

from t5xlike import errors, interfaces, metrics
from t5xlike.cli import entry
from t5xlike.inference import checkpoint_loading, decoding
from t5xlike.inference.task_evaluator import InferenceEvaluator
from t5xlike.runs.run_config import DataConfig, PartitioningConfig
from t5xlike.trackers import tracker as tracker_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalPlan:
  """A validated evaluation: the tasks' examples read, the checkpoint loaded.

  Attributes:
    evaluator: the tasks with metric functions and their examples.
    model: the model (wrapped with its technique for a PEFT checkpoint).
    params: the checkpoint's parameters, laid out on the mesh.
    step: the checkpoint's step (the rows' `step`).
    output_dir: EVAL_OUTPUT_DIR.
  """
  evaluator: InferenceEvaluator
  model: interfaces.DecodingModel
  params: Any
  step: int
  output_dir: str
  trackers: Sequence[tracker_lib.Tracker] = ()


def evaluate(*, model: interfaces.DecodingModel, checkpoint_path: str | None,
             eval_output_dir: str | None, data: DataConfig,
             partitioning: PartitioningConfig = PartitioningConfig(),
             decoding_config: decoding.DecodingConfig | None = None,
             max_examples: int | None = None,
             max_decode_length: int | None = None,
             trackers: Sequence[tracker_lib.Tracker] = ()) -> dict[str, dict[str, Any]]:
  """Evaluates CHECKPOINT_PATH on every task of MIXTURE_OR_TASK_NAME; returns {task: metrics}.

  Args:
    model: the model (MODEL).
    checkpoint_path: CHECKPOINT_PATH, a step directory `.../checkpoint_<N>` (or a PEFT one).
    eval_output_dir: EVAL_OUTPUT_DIR, where metrics/ and inference_eval/ are written.
    data: the task or mixture, its split, TASK_FEATURE_LENGTHS, BATCH_SIZE (examples
      per compiled call), task caches.
    partitioning: the mesh the parameters are laid out on (MESH_SHAPE).
    decoding_config: greedy (default), sampling or beam search.
    max_examples: at most this many examples per task (EVAL_MAX_EXAMPLES; None: all).
    max_decode_length: most tokens generated (default TASK_FEATURE_LENGTHS['targets']).
    trackers: experiment trackers that get the rows too (process 0), the operative gin as
      the run's config (`t5xlike.trackers`; gin_configs/trackers/{wandb,mlflow}.gin); their
      run is EVAL_OUTPUT_DIR's.
  """
  checked = tracker_lib.checked(trackers, "eval_run.evaluate.trackers")
  plan = plan_evaluation(
      model=model, checkpoint_path=checkpoint_path, eval_output_dir=eval_output_dir, data=data,
      partitioning=partitioning, decoding_config=decoding_config, max_examples=max_examples,
      max_decode_length=max_decode_length)
  return execute(dataclasses.replace(plan, trackers=checked))


def plan_evaluation(*, model: interfaces.DecodingModel, checkpoint_path: str | None,
                    eval_output_dir: str | None, data: DataConfig,
                    partitioning: PartitioningConfig,
                    decoding_config: decoding.DecodingConfig | None,
                    max_examples: int | None, max_decode_length: int | None) -> EvalPlan:
  """Checks the evaluation (arguments as `evaluate`'s) and loads what it needs; nothing
  written. ConfigError (one line) on a problem."""
  # CHECKPOINT_PATH first: reading the tasks is wasted without it.
  checkpoint_path = checkpoint_loading.require_checkpoint_path(checkpoint_path)
  if not eval_output_dir:
    raise errors.ConfigError("EVAL_OUTPUT_DIR is not set (pass --gin.EVAL_OUTPUT_DIR=DIR)")
  errors.require_int("BATCH_SIZE", data.batch_size)
  if not data.mixture_or_task_name:
    raise errors.ConfigError("MIXTURE_OR_TASK_NAME is not set")
  partitioner = partitioning.partitioner()
  evaluator = InferenceEvaluator(
      data.mixture_or_task_name, data.task_feature_lengths, data.batch_size,
      split=data.split, max_examples=max_examples, decoding_config=decoding_config,
      max_decode_length=max_decode_length, use_cached_tasks=data.use_cached_tasks,
      task_cache_dir=data.task_cache_dir, mixture_or_task_module=data.mixture_or_task_module,
      mode_switching=data.mode_switching)
  try:
    evaluator.prepare()
  except errors.ConfigError:
    raise
  except ValueError as error:
    raise errors.ConfigError(f"MIXTURE_OR_TASK_NAME: {errors.one_line(error)}") from None
  if not evaluator.tasks:
    raise errors.ConfigError(f"MIXTURE_OR_TASK_NAME={data.mixture_or_task_name!r}: no task of "
                             f"it has metric functions: nothing to evaluate")
  model, params, step = checkpoint_loading.load_model_checkpoint(
      model, checkpoint_path, data.task_feature_lengths, partitioner)
  return EvalPlan(evaluator=evaluator, model=model, params=params, step=step,
                  output_dir=eval_output_dir)


def execute(plan: EvalPlan) -> dict[str, dict[str, Any]]:
  """Evaluates and writes the rows and outputs (from here on EVAL_OUTPUT_DIR is written)."""
  entry.mark_run_started()
  results = plan.evaluator.evaluate(plan.model, plan.params, plan.step, plan.output_dir,
                                    show_progress=True)
  metrics.write_eval_rows(plan.output_dir, plan.step, results, "eval", _open_trackers(plan))
  log.info("wrote %s", epath.Path(plan.output_dir) / "metrics" / "eval.jsonl")
  return results


def _open_trackers(plan: EvalPlan) -> list[tracker_lib.Tracker]:
  """The selected trackers opened on process 0 for EVAL_OUTPUT_DIR, with the operative gin
  as the run's config and as its attached `config.gin`."""
  return tracker_lib.open_for(plan.trackers, plan.output_dir,
                              lambda: {"config.gin": gin.operative_config_str()})

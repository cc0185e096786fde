"""The run that `python -m t5xlike.lm_eval` executes (gin root `lm_eval_run.evaluate_harness`).

`evaluate_harness(...)` is `execute(plan_harness(...))`: the plan checks
CHECKPOINT_PATH, EVAL_OUTPUT_DIR and the harness tasks (`--tasks`, found in lm_eval's
own tasks or the YAML files under `--include_path`), then loads the parameters
(nothing written); `execute` runs `lm_eval.simple_evaluate` with
`inference.lm_eval_model.HarnessLM` and writes the harness's results JSON to
EVAL_OUTPUT_DIR/lm_eval/results-<step>.json and one row per harness task to
EVAL_OUTPUT_DIR/metrics/eval.jsonl (`harness_rows`); with `--log_samples` also every
request and response, EVAL_OUTPUT_DIR/lm_eval/samples-<task>-<step>.jsonl (the
harness's per-document records: `doc`, `arguments`, `resps`, `filtered_resps`, ...).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import lm_eval
from etils import epath
from lm_eval import utils as lm_eval_utils
from lm_eval.tasks import TaskManager

from t5xlike import errors, interfaces, metrics
from t5xlike.cli import entry
from t5xlike.inference import checkpoint_loading, decoding, jsonl_io
from t5xlike.inference.lm_eval_model import HarnessLM, layout_of
from t5xlike.runs.run_config import DataConfig, PartitioningConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class HarnessPlan:
  """A validated harness evaluation: the tasks found, the checkpoint loaded.

  Attributes:
    lm: the model as the harness's LM.
    tasks: the harness task (or group) names, or YAML files.
    task_manager: the lm_eval TaskManager that knows them.
    step: the checkpoint's step (the rows' `step`, the results file's name).
    output_dir: EVAL_OUTPUT_DIR.
    log_samples: write each task's requests and responses (`--log_samples`).
    options: keyword arguments of `lm_eval.simple_evaluate` (few-shot, limit, seeds).
  """
  lm: HarnessLM
  tasks: list[str]
  task_manager: Any
  step: int
  output_dir: str
  log_samples: bool
  options: dict[str, Any]


def evaluate_harness(*, model: interfaces.DecodingModel, checkpoint_path: str | None,
                     eval_output_dir: str | None, data: DataConfig, tasks: Sequence[str],
                     include_path: Sequence[str] = (), num_fewshot: int | None = None,
                     limit: float | None = None, bootstrap_iters: int = 100000,
                     log_samples: bool = False,
                     partitioning: PartitioningConfig = PartitioningConfig(),
                     decoding_config: decoding.DecodingConfig | None = None,
                     decoder_context: str = "prefix", random_seed: int = 0
                     ) -> dict[str, dict[str, Any]]:
  """Evaluates CHECKPOINT_PATH on lm-evaluation-harness tasks; returns {task: metrics}
  (the eval.jsonl rows' values).

  Args:
    model: the model (MODEL), encoder-decoder or decoder-only, with its VOCABULARY.
    checkpoint_path: CHECKPOINT_PATH, a step directory `.../checkpoint_<N>` (or a PEFT one).
    eval_output_dir: EVAL_OUTPUT_DIR, where lm_eval/ and metrics/ are written.
    data: TASK_FEATURE_LENGTHS (context ids + EOS, continuation ids) and BATCH_SIZE.
    tasks: `--tasks`, harness task, group or tag names or YAML files.
    include_path: `--include_path`, directories of task YAML files.
    num_fewshot, limit, bootstrap_iters: `lm_eval.simple_evaluate`'s (`--num_fewshot`,
      `--limit`: examples per task, or a fraction below 1; `--bootstrap_iters`).
    log_samples: `--log_samples`: also write every request and response per task.
    partitioning: the mesh the parameters are laid out on (MESH_SHAPE).
    decoding_config: generation's decoding (greedy by default).
    decoder_context: DECODER_CONTEXT, decoder-only models: 'prefix' or 'causal'.
    random_seed: RANDOM_SEED (the harness's seeds and sampling's).
  """
  return execute(plan_harness(
      model=model, checkpoint_path=checkpoint_path, eval_output_dir=eval_output_dir, data=data,
      tasks=tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit,
      bootstrap_iters=bootstrap_iters, log_samples=log_samples, partitioning=partitioning,
      decoding_config=decoding_config, decoder_context=decoder_context,
      random_seed=random_seed))


def plan_harness(*, model: interfaces.DecodingModel, checkpoint_path: str | None,
                 eval_output_dir: str | None, data: DataConfig, tasks: Sequence[str],
                 include_path: Sequence[str], num_fewshot: int | None, limit: float | None,
                 bootstrap_iters: int, log_samples: bool, partitioning: PartitioningConfig,
                 decoding_config: decoding.DecodingConfig | None, decoder_context: str,
                 random_seed: int) -> HarnessPlan:
  """Checks the run (arguments as `evaluate_harness`'s), finds the tasks and loads the
  parameters; nothing written. ConfigError (one line) on a problem."""
  checkpoint_path = checkpoint_loading.require_checkpoint_path(checkpoint_path)
  if not eval_output_dir:
    raise errors.ConfigError("EVAL_OUTPUT_DIR is not set (pass --gin.EVAL_OUTPUT_DIR=DIR)")
  errors.require_int("BATCH_SIZE", data.batch_size)
  if num_fewshot is not None:
    errors.require_int("--num_fewshot", num_fewshot, minimum=0)
  layout_of(model, decoder_context)  # a model or DECODER_CONTEXT it cannot serve
  names = [name for name in tasks if name]
  if not names:
    raise errors.ConfigError("--tasks is empty: name the harness tasks, e.g. --tasks=hellaswag")
  for directory in include_path:
    if not epath.Path(directory).is_dir():
      raise errors.ConfigError(f"--include_path={directory}: no such directory")
  task_manager = harness_task_manager(names, list(include_path))
  partitioner = partitioning.partitioner()
  model, params, step = checkpoint_loading.load_model_checkpoint(
      model, checkpoint_path, data.task_feature_lengths, partitioner)
  lm = HarnessLM(model, params, data.task_feature_lengths, data.batch_size, decoding_config,
                 decoder_context=decoder_context, seed=random_seed)
  options = {"num_fewshot": num_fewshot, "limit": limit, "bootstrap_iters": bootstrap_iters,
             "random_seed": random_seed, "numpy_random_seed": random_seed,
             "torch_random_seed": random_seed, "fewshot_random_seed": random_seed}
  return HarnessPlan(lm=lm, tasks=names, task_manager=task_manager, step=step,
                     output_dir=eval_output_dir, log_samples=bool(log_samples), options=options)


def harness_task_manager(names: Sequence[str], include_path: Sequence[str]) -> Any:
  """An lm_eval TaskManager that knows every name (a task, group or tag, or a YAML file):
  the YAML files under `include_path` alone when they hold them all (indexing lm_eval's
  own tasks takes seconds), else those and lm_eval's. ConfigError naming the first
  unknown task."""
  def unknown(manager: TaskManager) -> list[str]:
    return [name for name in names if name not in manager.all_tasks
            and not (name.endswith((".yaml", ".yml")) and epath.Path(name).is_file())]
  if include_path:
    local = TaskManager(include_path=list(include_path), include_defaults=False)
    if not unknown(local):
      return local
  manager = TaskManager(include_path=list(include_path) or None)
  missing = unknown(manager)
  if missing:
    where = f" nor under --include_path={','.join(include_path)}" if include_path else ""
    raise errors.ConfigError(f"--tasks: {missing[0]!r} is not a harness task (not one of "
                             f"lm_eval {lm_eval.__version__}'s{where})")
  return manager


def harness_rows(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """{task: eval.jsonl values} of `simple_evaluate`'s results: each numeric metric
  ('acc,none' -> 'acc'; another filter: 'exact_match,strict-match' ->
  'exact_match/strict-match'; stderrs 'N/A' left out) and `examples`, the examples
  evaluated."""
  rows: dict[str, dict[str, Any]] = {}
  samples = results.get("n-samples", {})
  for task, values in results.get("results", {}).items():
    row: dict[str, Any] = {}
    for key, value in values.items():
      metric, comma, filter_name = key.partition(",")
      if not comma or isinstance(value, bool) or not isinstance(value, (int, float)):
        continue
      row[metric if filter_name == "none" else f"{metric}/{filter_name}"] = float(value)
    if task in samples:
      row["examples"] = int(samples[task]["effective"])
    rows[task] = row
  return rows


def execute(plan: HarnessPlan) -> dict[str, dict[str, Any]]:
  """Runs the harness and writes its results (from here on EVAL_OUTPUT_DIR is written)."""
  entry.mark_run_started()
  results = lm_eval.simple_evaluate(model=plan.lm, tasks=list(plan.tasks),
                                    task_manager=plan.task_manager,
                                    log_samples=plan.log_samples, **plan.options)
  if results is None:  # not the harness's rank 0 (one process here)
    return {}
  rows = harness_rows(results)
  if jax.process_index() != 0:  # (every JAX process runs the harness; process 0 writes)
    return rows
  directory = epath.Path(plan.output_dir) / "lm_eval"
  samples = results.pop("samples", None) or {}
  for task, records in samples.items():
    jsonl_io.write_text_atomically(directory / f"samples-{task}-{plan.step}.jsonl", "".join(
        _json(record) + "\n" for record in records))
  path = jsonl_io.write_text_atomically(directory / f"results-{plan.step}.json",
                           _json(results, indent=2) + "\n")
  metrics.write_eval_rows(plan.output_dir, plan.step, rows, "lm_eval")
  log.info("wrote %s and %s", path, epath.Path(plan.output_dir) / "metrics" / "eval.jsonl")
  return rows


def _json(value: Any, indent: int | None = None) -> str:
  return json.dumps(value, indent=indent, ensure_ascii=False,
                    default=lm_eval_utils.handle_non_serializable)

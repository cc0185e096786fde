"""The run of `python -m t5xlike.precompute_reference` (gin root
`precompute_reference_run.precompute_reference`): a frozen reference model's log-likelihoods of
a preference task's completions, computed once and written into a cached copy of the task.

DPO and IPO compare the policy's log-likelihoods with a frozen reference's
(`posttrain.preference`). With the reference in the run, every step runs two
models. Precomputed, each pairwise example carries two float32 scalars,
`reference_chosen_logp` and `reference_rejected_logp` (`data.pairwise`): the
reference's summed log-likelihood of the chosen and of the rejected completion
given the prompt, and the run holds one model
(`posttrain/precomputed_reference.gin`: `PreferenceModel.reference = None`).

What is scored is what the reference in the run scores: each completion with
EOS appended after trimming to its TASK_FEATURE_LENGTHS entry, the prompt
likewise, at the lengths of one side's rows (`pairwise.side_lengths`), through
`Predictor.score` (`infer --mode=score`: batched as BATCH_SIZE, compiled once,
the parameters laid out on MESH_SHAPE's mesh). The reference is
REFERENCE_CHECKPOINT_PATH, or INITIAL_CHECKPOINT_PATH (the starting policy)
when that is None, as in the run.

Written as a selection of every example (`data.selected_task`, score
'reference_logp'): `OUT/NAME/selection.json` and a task cache per source task
and split (`--splits`, default train and validation: evaluation needs the
scalars too). Train on it with `--gin.MIXTURE_OR_TASK_NAME="'NAME'"
--gin.TASK_CACHE_DIR=OUT` and `posttrain/precomputed_reference.gin`. The
scalars are per example, so the run cannot pack its rows; the on-policy mode
samples completions the cache cannot hold and needs the reference in the run.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from t5xlike import errors, interfaces
from t5xlike.cli import entry
from t5xlike.data import feed_steps, pairwise, selected_task, task_examples
from t5xlike.inference import checkpoint_loading
from t5xlike.inference.predictor import Predictor
from t5xlike.runs.run_config import DataConfig, PartitioningConfig

log = logging.getLogger(__name__)

SCORE = "reference_logp"


def reference_checkpoint(reference_checkpoint_path: str | None,
                         initial_checkpoint_path: str | None) -> str:
  """The step directory of the reference (REFERENCE_CHECKPOINT_PATH, else
  INITIAL_CHECKPOINT_PATH), or a ConfigError naming the macro."""
  macro = "REFERENCE_CHECKPOINT_PATH" if reference_checkpoint_path else "INITIAL_CHECKPOINT_PATH"
  path = reference_checkpoint_path or initial_checkpoint_path
  if not path:
    raise errors.ConfigError("set REFERENCE_CHECKPOINT_PATH or INITIAL_CHECKPOINT_PATH: the "
                             "reference model whose log-likelihoods are precomputed")
  return str(checkpoint_loading.require_checkpoint_path(path, macro))


def side_log_likelihoods(predictor: Predictor, examples: Sequence[dict[str, np.ndarray]],
                         side: str) -> np.ndarray:
  """float32 [n]: the summed natural-log likelihood of each example's `side` completion
  ('chosen' or 'rejected', EOS appended) given its prompt `inputs`."""
  scores = predictor.score([pairwise.side_example(ex, side) for ex in examples])
  return np.asarray([score.total for score in scores], np.float32)


def precompute_reference(*, model: interfaces.TokenLogitsModel,
                         reference_checkpoint_path: str | None,
                         initial_checkpoint_path: str | None, data: DataConfig,
                         name: str | None = None, output_dir: str | None = None,
                         splits: Sequence[str] = ("train", "validation"),
                         partitioning: PartitioningConfig = PartitioningConfig()
                         ) -> dict[str, Any]:
  """Scores every pair of MIXTURE_OR_TASK_NAME's `splits` with the reference and writes the
  task again as `name` into `output_dir`, each example with its two scalars; returns the
  manifest (`selected_task.write`).

  Args:
    model: the reference's (plain) model, MODEL.
    reference_checkpoint_path: REFERENCE_CHECKPOINT_PATH (None: the next).
    initial_checkpoint_path: INITIAL_CHECKPOINT_PATH.
    data: MIXTURE_OR_TASK_NAME / _MODULE (a pairwise task or a mixture of them),
      TASK_FEATURE_LENGTHS ('inputs', 'chosen', 'rejected'), BATCH_SIZE (rows per
      compiled call), USE_CACHED_TASKS / TASK_CACHE_DIR (where the source is read).
    name: the task (or mixture) name written (`--name`).
    output_dir: the task cache directory written into (`--output_dir`).
    splits: the splits scored (`--splits`); those a task lacks are skipped.
    partitioning: the mesh the parameters are laid out on (MESH_SHAPE).
  """
  if not output_dir:
    raise errors.ConfigError("--output_dir is required: the task cache directory to write "
                             "(train with TASK_CACHE_DIR set to it)")
  if not splits:
    raise errors.ConfigError("--splits is empty: name the splits to score")
  path = reference_checkpoint(reference_checkpoint_path, initial_checkpoint_path)
  errors.require_int("BATCH_SIZE", data.batch_size)
  if not data.mixture_or_task_name:
    raise errors.ConfigError("MIXTURE_OR_TASK_NAME is not set: the pairwise task to score")
  if data.mode_switching is not None and data.mode_switching.active:
    raise errors.ConfigError("MODE_TOKEN / TASK_MODE_TOKENS: the reference in a run would see "
                             "the paradigm token; precompute without mode switching")
  try:
    lengths = pairwise.side_lengths(data.task_feature_lengths)
    task_examples.import_module(data.mixture_or_task_module)
    tasks = task_examples.leaf_tasks(data.mixture_or_task_name, data.task_cache_dir)
    for task in tasks:
      pairwise.check_features(list(task.output_features), f"task {task.name!r}")
  except ValueError as error:
    raise errors.ConfigError(f"MIXTURE_OR_TASK_NAME: {errors.one_line(error)}") from None
  name = selected_task.check_name(name, [task.name for task in tasks])
  read = {task.name: task_examples.read_source_splits(task, splits,
                                                      use_cached=data.use_cached_tasks,
                                                      cache_dir=data.task_cache_dir)
          for task in tasks}
  first = splits[0]
  for task in tasks:
    if first not in read[task.name][0]:
      raise errors.ConfigError(f"task {task.name!r} has no split {first!r} (the first of "
                               f"--splits: the one training reads)")
  model, params, step = checkpoint_loading.load_model_checkpoint(
      model, path, lengths, partitioning.partitioner())
  eos_id = model.vocabulary.eos_id if model.vocabulary is not None else 1
  predictor = Predictor(model, params, lengths, data.batch_size, eos_id=eos_id,
                        progress="reference")

  entry.mark_run_started()
  start = time.perf_counter()
  written = []
  for task in tasks:
    task_splits, eos_features = read[task.name]
    scored = {}
    for split, examples in task_splits.items():
      split_start = time.perf_counter()
      model_examples = [feed_steps.append_eos(ex, eos_features, data.task_feature_lengths,
                                              eos_id) for ex in examples]
      values = {feature: side_log_likelihoods(predictor, model_examples, side)
                for side, feature in pairwise.REFERENCE_FEATURES.items()}
      scored[split] = [{**ex, **{feature: np.asarray(value[i], np.float32)
                                 for feature, value in values.items()}}
                       for i, ex in enumerate(examples)]
      log.info("%s/%s: %d pairs scored by the reference (step %d) in %.1f s", task.name, split,
               len(examples), step, time.perf_counter() - split_start)
    written.append(selected_task.SelectedTask(
        source=task.name, splits=scored, examples=len(task_splits[first]),
        eos_features=eos_features))
  count = sum(len(task.splits[first]) for task in written)
  mixture = len(tasks) > 1 or tasks[0].name != data.mixture_or_task_name
  manifest = {"source": data.mixture_or_task_name, "module": data.mixture_or_task_module,
              "score": SCORE, "order": None, "k": count, "num_examples": count,
              "num_selected": count, "checkpoint": path, "step": step,
              "feature_lengths": dict(data.task_feature_lengths),
              "seconds": {SCORE: round(time.perf_counter() - start, 3)}}
  record = selected_task.write(name, epath.Path(output_dir), written, split=first,
                               mixture=mixture, manifest=manifest)
  log.info("%s: %d tasks with the reference's log-likelihoods written into %s (train with "
           "--gin.MIXTURE_OR_TASK_NAME=\"'%s'\" --gin.TASK_CACHE_DIR=%s and "
           "posttrain/precomputed_reference.gin)", name, len(written), output_dir, name,
           output_dir)
  return record

"""The run behind `python -m t5xlike.prune` (gin root `prune_run.prune`): structured pruning.

`prune(...)` is `execute(plan_pruning(...))`. The plan checks everything and
writes nothing: the model's family, CHECKPOINT_PATH, `--output`, the pruning
targets against the network (one line naming the flag: a size that leaves
nothing, a head count that breaks the key/value grouping, a flag of the other
family), the task, and it reads the calibration and held-out batches and
loads the parameters onto the mesh. `execute` scores every structure on the
calibration batches (`compression.importance`, Minitron's activation-based
importance), keeps the top ones (`compression.pruning`) and writes OUT under
a temporary name, renamed when complete:

  OUT/checkpoint/  an orbax step directory {step: 0, params} (`interop.output_dir`):
                   a new, smaller model at step 0, so a retraining or
                   distillation run from it (INITIAL_CHECKPOINT_PATH) counts
                   TRAIN_STEPS from 0; CHECKPOINT_PATH of `eval` and `infer`;
  OUT/model.gin    MODEL with the pruned network config, the source's vocabulary
                   and loss settings (the scan / remat settings kept);
  OUT/teacher.gin  TEACHER (scope `teacher/`): the source's network config, and
                   TEACHER_CHECKPOINT_PATH: the source checkpoint, for the
                   recovery by distillation (`posttrain/distill_pruned.gin`);
  OUT/prune.json   the source, the targets, the kept indices, the scores, the
                   parameter counts and the losses before and after pruning.

The calibration batches are training batches: the task, lengths and
objective of the training run's gin files (the objective bound to
`train_run.train`, as `inspect_data` reads it; `prune_run.prune.objective`
overrides), CALIBRATION_BATCHES of BATCH_SIZE rows from its train split. The
held-out loss is the training run's evaluation: HELD_OUT_BATCHES batches of
the validation split, unshuffled, `metrics(...)['loss']` (as eval.jsonl).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import gin
import jax
import numpy as np

from t5xlike import errors
from t5xlike.cli import entry
from t5xlike.compression import importance, pruning
from t5xlike.data import pipeline
from t5xlike.inference import checkpoint_loading
from t5xlike.inference.predictor import example_features
from t5xlike.interop import network_shapes, output_dir, param_trees
from t5xlike.objectives.base import Objective
from t5xlike.runs import train_plan
from t5xlike.runs.run_config import DataConfig, PartitioningConfig

log = logging.getLogger(__name__)

#: `objective` default: the objective the loaded gin files bind to `train_run.train`.
TRAINING_OBJECTIVE = "training"
#: The flags that set the sizes kept (`pruning.targets_from_flags`'s arguments).
TARGET_FLAGS = ("num_layers", "num_encoder_layers", "num_decoder_layers", "drop_layers",
                "heads", "kv_heads", "mlp_dim", "emb_dim")
PRUNE_JSON = "prune.json"
TEACHER_GIN = "teacher.gin"
#: `--importance`: how structures are ranked.
IMPORTANCE_SCORES = ("activation", "random")


@dataclasses.dataclass
class PrunePlan:
  """A validated pruning: targets checked, batches read, parameters loaded.

  Attributes:
    model: the source model (MODEL) and `config`, its network config.
    params: CHECKPOINT_PATH's parameters on the mesh; `step`, its step.
    checkpoint_path: CHECKPOINT_PATH.
    output: OUT (absent or empty).
    targets: the sizes kept; `flags`, as given.
    layer_criterion: how layers are ranked ('block_importance' or 'loss').
    importance: 'activation' (Minitron's scores) or 'random' (the baseline: every
      structure scored at random, seeded by `seed`).
    seed: RANDOM_SEED.
    calibration: the calibration batches; `held_out`, the held-out ones (maybe none).
    feature_lengths: TASK_FEATURE_LENGTHS (the shapes the parameters are built for).
    partitioner: the mesh.
  """
  model: Any
  config: pruning.Config
  params: Any
  step: int
  checkpoint_path: str
  output: pathlib.Path
  targets: pruning.Targets
  flags: dict[str, str]
  layer_criterion: str
  importance: str
  seed: int
  calibration: list[dict[str, np.ndarray]]
  held_out: list[dict[str, np.ndarray]]
  feature_lengths: Mapping[str, int]
  partitioner: Any


def prune(*, model: Any, checkpoint_path: str | None, data: DataConfig,
          output: str | None = None, targets: Mapping[str, str | None] | None = None,
          layer_importance: str = "block_importance", importance_scores: str = "activation",
          objective: Objective | str | None = TRAINING_OBJECTIVE,
          partitioning: PartitioningConfig = PartitioningConfig(), calibration_batches: int = 32,
          held_out_batches: int = 8, held_out_split: str = "validation",
          random_seed: int = 0) -> pathlib.Path:
  """Prunes CHECKPOINT_PATH to the target sizes; returns OUT.

  Args:
    model: MODEL, a T5 encoder-decoder or a decoder-only model.
    checkpoint_path: CHECKPOINT_PATH, a step directory `.../checkpoint_<N>`.
    data: the calibration task (MIXTURE_OR_TASK_NAME, its split 'train'),
      TASK_FEATURE_LENGTHS, BATCH_SIZE, task caches.
    output: `--output`, the directory written (absent or empty).
    targets: {flag name in TARGET_FLAGS: value}, e.g. {'heads': '2', 'mlp_dim': '50%'}.
    layer_importance: `--layer_importance`, 'block_importance' or 'loss'.
    importance_scores: `--importance`, 'activation' (Minitron's) or 'random' (a seeded
      random choice of the same sizes: the baseline the scores are measured against).
    objective: makes model examples of the task's text (default: the training
      run's, `train_run.train.objective`; None: the task's own examples).
    partitioning: the mesh (MESH_SHAPE).
    calibration_batches: CALIBRATION_BATCHES, batches of BATCH_SIZE rows scored.
    held_out_batches: HELD_OUT_BATCHES, batches of `held_out_split` whose loss is
      reported before and after (0: none).
    held_out_split: the held-out split.
    random_seed: the calibration rows' shuffle seed (and the random scores' seed).
  """
  return execute(plan_pruning(
      model=model, checkpoint_path=checkpoint_path, data=data, output=output,
      targets=targets or {}, layer_importance=layer_importance,
      importance_scores=importance_scores, objective=objective,
      partitioning=partitioning, calibration_batches=calibration_batches,
      held_out_batches=held_out_batches, held_out_split=held_out_split,
      random_seed=random_seed))


def plan_pruning(*, model: Any, checkpoint_path: str | None, data: DataConfig,
                 output: str | None, targets: Mapping[str, str | None], layer_importance: str,
                 importance_scores: str, objective: Objective | str | None,
                 partitioning: PartitioningConfig,
                 calibration_batches: int, held_out_batches: int, held_out_split: str,
                 random_seed: int) -> PrunePlan:
  """Checks the pruning (arguments as `prune`'s) and reads what it needs; nothing written.
  ConfigError (one line) on a problem."""
  config = train_plan.validated(lambda: pruning.network_config(model), "MODEL")
  checkpoint_path = checkpoint_loading.require_checkpoint_path(checkpoint_path)
  out = _checked_output(output)
  unknown = sorted(set(targets) - set(TARGET_FLAGS))
  if unknown:
    raise errors.ConfigError(f"unknown pruning targets {unknown}: expected {TARGET_FLAGS}")
  flags = {name: str(value) for name, value in targets.items()
           if value is not None and str(value).strip()}
  try:
    resolved = pruning.targets_from_flags(config, **flags)
  except ValueError as error:
    raise errors.ConfigError(errors.one_line(error)) from None
  if resolved.is_empty():
    raise errors.ConfigError("nothing to prune: give the sizes kept, e.g. --heads=2, "
                             "--mlp_dim=50%, --emb_dim=48, --num_layers=1 or --drop_layers=...")
  if layer_importance not in importance.LAYER_CRITERIA:
    raise errors.ConfigError(f"--layer_importance={layer_importance}: expected one of "
                             f"{', '.join(importance.LAYER_CRITERIA)}")
  if importance_scores not in IMPORTANCE_SCORES:
    raise errors.ConfigError(f"--importance={importance_scores}: expected one of "
                             f"{', '.join(IMPORTANCE_SCORES)}")
  errors.require_int("CALIBRATION_BATCHES", calibration_batches)
  errors.require_int("HELD_OUT_BATCHES", held_out_batches, 0)
  if jax.process_count() > 1:
    raise errors.ConfigError("prune runs in one process (its mesh may span that process's "
                             "devices)")
  partitioner = partitioning.partitioner()
  calibration, held_out = _read_batches(model, data, _objective(objective), calibration_batches,
                                        held_out_batches, held_out_split, random_seed,
                                        partitioner)
  params, step = checkpoint_loading.load_checkpoint(model, checkpoint_path,
                                                    data.task_feature_lengths, partitioner)
  return PrunePlan(model=model, config=config, params=params, step=step,
                   checkpoint_path=checkpoint_path, output=out, targets=resolved, flags=flags,
                   layer_criterion=layer_importance, importance=importance_scores,
                   seed=random_seed, calibration=calibration, held_out=held_out,
                   feature_lengths=data.task_feature_lengths, partitioner=partitioner)


def _checked_output(output: str | None) -> pathlib.Path:
  """OUT, absent or an empty directory, in a writable directory."""
  if not output:
    raise errors.ConfigError("--output is not set (the directory the pruned checkpoint and "
                             "model.gin are written to)")
  out = pathlib.Path(output).absolute()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise errors.ConfigError(f"--output={output} exists and is not empty")
  parent = next((p for p in out.parents if p.exists()), None)
  if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
    raise errors.ConfigError(f"--output={output} cannot be created (no writable parent)")
  return out


def _objective(objective: Objective | str | None) -> Objective | None:
  """The objective: the training run's (`train_run.train.objective` in the loaded gin
  files, None when they bind none) for TRAINING_OBJECTIVE."""
  if objective != TRAINING_OBJECTIVE:
    if isinstance(objective, str):
      raise errors.ConfigError(f"prune_run.prune.objective={objective!r}: expected an "
                               f"objective (@...), None or {TRAINING_OBJECTIVE!r}")
    return objective
  try:
    reference = gin.query_parameter("train_run.train.objective")
  except ValueError:  # no training run's gin file loaded
    return None
  return reference.scoped_configurable_fn() if reference is not None else None


def _read_batches(model: Any, data: DataConfig, objective: Objective | None, count: int,
                  held_out_count: int, held_out_split: str, seed: int,
                  partitioner: Any) -> tuple[list[dict[str, np.ndarray]],
                                             list[dict[str, np.ndarray]]]:
  """(calibration batches of the train split, held-out batches), read now."""
  if not data.mixture_or_task_name:
    raise errors.ConfigError(
        "MIXTURE_OR_TASK_NAME is not set: pass the training run's gin files (e.g. "
        "--gin_file=gin_configs/quickstart.gin): their task, TASK_FEATURE_LENGTHS and "
        "objective make the calibration batches")
  errors.require_int("BATCH_SIZE", data.batch_size)
  if data.batch_size % partitioner.data_parallel_size:
    raise errors.ConfigError(f"BATCH_SIZE={data.batch_size} is not divisible by the "
                             f"data-parallel size {partitioner.data_parallel_size} of MESH_SHAPE")
  train_plan.import_task_module(data.mixture_or_task_module)
  feed_args = dict(feature_converter=model.feature_converter, use_cached=data.use_cached_tasks,
                   cache_dir=data.task_cache_dir, num_threads=data.data_threads, seed=seed)
  name = data.mixture_or_task_name
  calibration = train_plan.validated(lambda: _take(pipeline.make_feed(
      name, data.split, data.task_feature_lengths, data.batch_size, objective, pack=data.pack,
      **feed_args), count, data.split), "calibration data")
  held_out: list[dict[str, np.ndarray]] = []
  if held_out_count:
    held_out = train_plan.validated(lambda: _take(pipeline.make_feed(
        name, held_out_split, data.task_feature_lengths, data.batch_size, objective,
        num_epochs=1, shuffle=False, **feed_args), held_out_count, held_out_split),
        f"held-out data (split {held_out_split!r}; --gin.HELD_OUT_BATCHES=0: none)")
  return calibration, held_out


def _take(feed: Any, count: int, split: str) -> list[dict[str, np.ndarray]]:
  """The first `count` batches of a feed (fewer when a one-epoch split ends; none: error)."""
  batches: list[dict[str, np.ndarray]] = []
  try:
    for batch in feed:
      batches.append({k: np.asarray(v) for k, v in batch.items()})
      if len(batches) == count:
        break
  finally:
    feed.close()
  if not batches:
    raise ValueError(f"split {split!r} holds no batch of BATCH_SIZE rows")
  return batches


def execute(plan: PrunePlan) -> pathlib.Path:
  """Scores, selects, slices and writes OUT (from here on files are written)."""
  entry.mark_run_started()
  config = plan.config
  flat = _host_params(plan.params, config.scan_layers)
  scoring_model = importance.unscanned_model(plan.model)
  scoring_params = _on_mesh(scoring_model, flat, plan)
  with plan.partitioner.activate():  # (after `_on_mesh`: its abstract init needs no mesh)
    scores = importance.calibrate(scoring_model, scoring_params,
                                  _device_batches(plan, plan.calibration), config.head_dim,
                                  plan.layer_criterion)
  if plan.importance == "random":
    scores = importance.randomized(scores, plan.seed)
  selection = pruning.select(config, plan.targets, scores)
  pruned_config, pruned_flat = pruning.prune(config, flat, selection)
  param_trees.check_shapes(pruned_flat, network_shapes.param_shapes(
      dataclasses.replace(pruned_config, scan_layers=False)), "the pruned parameters")
  pruned_model = importance.with_network_config(plan.model, pruned_config)
  report = _report(plan, scores, selection, pruned_config, flat, pruned_flat)
  report["losses"] = _losses(plan, pruned_model, pruned_flat)
  for name, values in report["losses"].items():
    log.info("%s loss: %.4f before pruning, %.4f after", name, values["before"],
             values["after"])
  return _write(plan, pruned_config, pruned_flat, report)


def _host_params(params: Any, scanned: bool) -> dict[str, np.ndarray]:
  """The unscanned parameters as host NumPy arrays by '/'-joined path."""
  flat = {name: np.asarray(value)
          for name, value in param_trees.flatten(jax.device_get(params)).items()}
  return param_trees.unstack(flat) if scanned else flat


def _on_mesh(model: Any, flat: Mapping[str, np.ndarray], plan: PrunePlan) -> Any:
  """`model`'s parameters from host arrays (unscanned names; stacked when the model's
  network scans), laid out on the mesh as its logical axes say."""
  tree = param_trees.unflatten(param_trees.stack(flat) if model.network.config.scan_layers
                               else dict(flat))
  features = example_features(model, plan.feature_lengths)
  abstract, _ = checkpoint_loading.abstract_params(model, features, plan.partitioner)
  return jax.tree.map(lambda a, value: jax.device_put(np.asarray(value, a.dtype), a.sharding),
                      abstract, tree)


def _device_batches(plan: PrunePlan, batches: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
  sharding = plan.partitioner.batch_sharding()
  return [{k: jax.device_put(v, sharding) for k, v in batch.items()} for batch in batches]


def _losses(plan: PrunePlan, pruned_model: Any,
            pruned_flat: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
  """{'calibration' | 'held_out': {'before': loss, 'after': loss}} (per token, as eval.jsonl)."""
  pruned_params = _on_mesh(pruned_model, pruned_flat, plan)
  with plan.partitioner.activate():
    out = {}
    for name, batches in (("calibration", plan.calibration), ("held_out", plan.held_out)):
      if batches:
        on_device = _device_batches(plan, batches)
        out[name] = {"before": importance.mean_loss(plan.model, plan.params, on_device),
                     "after": importance.mean_loss(pruned_model, pruned_params, on_device)}
  return out


def _count(flat: Mapping[str, np.ndarray]) -> int:
  return int(sum(np.size(v) for v in flat.values()))


def _report(plan: PrunePlan, scores: importance.Importance, selection: pruning.Selection,
            pruned_config: pruning.Config, flat: Mapping[str, np.ndarray],
            pruned_flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """prune.json's content (without the losses)."""
  sizes = lambda c: {k: v for k, v in dataclasses.asdict(c).items()
                     if k.startswith("num_") or k.endswith("_dim")}
  log.info("pruned %s: %s -> %s; %s -> %s parameters", type(plan.config).__name__,
           sizes(plan.config), sizes(pruned_config), f"{_count(flat):,}",
           f"{_count(pruned_flat):,}")
  return {"checkpoint_path": plan.checkpoint_path, "source_step": plan.step, "step": 0,
          "targets": plan.flags, "layer_importance": plan.layer_criterion,
          "calibration_rows": scores.rows, "sizes": {"before": sizes(plan.config),
                                                     "after": sizes(pruned_config)},
          "parameters": {"before": _count(flat), "after": _count(pruned_flat)},
          "kept": selection.describe(), "importance": scores.describe()}


def _write(plan: PrunePlan, pruned_config: pruning.Config,
           pruned_flat: Mapping[str, np.ndarray], report: dict[str, Any]) -> pathlib.Path:
  """OUT under a temporary name, renamed when complete."""
  temporary = plan.output.parent / f".{plan.output.name}.incomplete"
  shutil.rmtree(temporary, ignore_errors=True)
  model = plan.model
  options = {"z_loss": model.z_loss, "label_smoothing": model.label_smoothing,
             "loss_impl": model.loss_impl}
  output_dir.write(temporary, pruned_config, pruned_flat,
                   output_dir.sentencepiece_file(model.vocabulary), final=plan.output,
                   written_by="prune", model_options=options)
  (temporary / TEACHER_GIN).write_text(output_dir.teacher_gin(
      plan.config, str(pathlib.Path(plan.checkpoint_path).resolve()), "prune", options))
  (temporary / PRUNE_JSON).write_text(json.dumps(report, indent=1) + "\n")
  if plan.output.exists():
    plan.output.rmdir()  # Empty (checked by the plan).
  temporary.rename(plan.output)
  log.info("wrote %s (%s, %s)", plan.output, output_dir.CHECKPOINT, output_dir.MODEL_GIN)
  return plan.output

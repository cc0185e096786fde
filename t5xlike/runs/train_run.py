"""The pretraining / training run that `python -m t5xlike.train` executes.

`train(...)` is the gin root of a run (`runs/pretrain.gin` binds it to the
T5X macros). It validates everything first (task, lengths, mesh, periods,
initial checkpoint) and writes nothing until validation has passed; then it
creates MODEL_DIR, resumes from its newest checkpoint (or starts from
INITIAL_CHECKPOINT_PATH, or from scratch) and trains to TRAIN_STEPS.
"""
from __future__ import annotations

import itertools
import logging
import os
import pathlib
from typing import Any, Callable, Mapping

import gin
import jax
import numpy as np
from etils import epath

from t5xlike import checkpoints, errors, flops, metrics, partitioning
from t5xlike.cli import entry
from t5xlike.data import batch_shapes, feature_converters, pipeline, sources, task_examples
from t5xlike.finetuning import selection
from t5xlike.objectives import base as objectives_base
from t5xlike.training import nan_policy as nan_policy_lib, preemption, trainer as trainer_lib

log = logging.getLogger(__name__)


def import_task_module(module: str | None) -> None:
  """Imports MIXTURE_OR_TASK_MODULE; a ConfigError when it cannot be imported."""
  try:
    task_examples.import_module(module)
  except ValueError as error:
    raise errors.ConfigError(str(error)) from None


def _validated(fn: Callable[[], Any], what: str) -> Any:
  try:
    return fn()
  except errors.ConfigError:
    raise
  except (ValueError, TypeError, KeyError) as error:
    raise errors.ConfigError(f"{what}: {errors.one_line(error)}") from None


def train(*, model: Any, model_dir: str, train_steps: int, batch_size: int,
          mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
          objective: objectives_base.Objective | None,
          optimizer: Callable[..., Any], learning_rate_schedule: Callable[[Any], Any],
          mixture_or_task_module: str | None = None, mesh_shape: Mapping[str, int] | None = None,
          dcn_mesh_shape: Mapping[str, int] | None = None,
          logical_axis_rules: partitioning.LogicalRules | str = "data_fsdp_tensor",
          random_seed: int = 0, initial_checkpoint_path: str | None = None,
          log_period: int = 100, eval_period: int | None = 1000, checkpoint_period: int = 1000,
          eval_steps: int = 10, eval_split: str = "validation", train_split: str = "train",
          keep_checkpoints: int | None = 3, async_checkpointing: bool = True,
          num_microbatches: int = 1, use_cached_tasks: bool = False,
          task_cache_dir: str | None = None, pack: bool = False, data_threads: int = 0,
          require_initial_checkpoint: bool = False, fresh_optimizer_state: bool = False,
          inference_evaluator: Any = None, finetuning: Any = None,
          nan_policy: str = "stop", nan_rollback_after: int | None = None,
          restore_strict: bool = False) -> trainer_lib.TrainState | None:
  """Trains `model` on a seqio task/mixture; returns the final state.

  Args mirror the T5X macros: MODEL_DIR, TRAIN_STEPS (total steps),
  BATCH_SIZE (global), MIXTURE_OR_TASK_NAME/MODULE, TASK_FEATURE_LENGTHS,
  MESH_SHAPE, RANDOM_SEED, INITIAL_CHECKPOINT_PATH, LOG_PERIOD, EVAL_PERIOD,
  CHECKPOINT_PERIOD, USE_CACHED_TASKS (read task caches from
  `task_cache_dir`, TASK_CACHE_DIR; see `python -m t5xlike.cache_tasks`);
  `pack` packs several examples per row; `data_threads` are the data
  pipeline's read threads. `optimizer` is a factory called with
  `learning_rate=learning_rate_schedule`; `eval_steps` batches of
  `eval_split` make each evaluation; `num_microbatches` > 1 accumulates
  gradients over that many slices of each batch; `require_initial_checkpoint`
  makes a missing INITIAL_CHECKPOINT_PATH an error (configs that only make
  sense from a checkpoint, such as SPDF's dense fine-tuning). A model with
  `exports(params) -> {name: params}` (ELECTRA's discriminator) has those
  written to `MODEL_DIR/<name>/checkpoint_<TRAIN_STEPS>` at the end.
  `fresh_optimizer_state` starts from INITIAL_CHECKPOINT_PATH's parameters and
  step with a new optimizer state (fine-tuning). `inference_evaluator` (an
  `task_evaluator.InferenceEvaluator`) adds the tasks' metric functions to every
  evaluation (rows per task in metrics/eval.jsonl, outputs in
  MODEL_DIR/inference_eval/). `finetuning` (a technique of
  `t5xlike.finetuning`, e.g. `gin_configs/finetune/llrd.gin`) selects the
  trained parameters and their learning rates (the trainer wraps the
  optimizer) and may change the parameters once when the run starts from
  INITIAL_CHECKPOINT_PATH (`initialize`; never on a resume).
  `nan_policy` (NAN_POLICY: 'stop' or 'skip') and `nan_rollback_after`
  (NAN_ROLLBACK_AFTER) say what a NaN / Inf step does (`t5xlike.training.nan_policy`);
  `restore_strict` (RESTORE_STRICT) makes a corrupt newest checkpoint an
  error instead of a fall-back to the previous one. SIGTERM / SIGINT stop the
  run after a checkpoint of the step reached (`t5xlike.training.preemption`).
  """
  # ---- validation: nothing is written before this block has passed. ----
  if not model_dir:
    raise errors.ConfigError("MODEL_DIR is not set (pass --gin.MODEL_DIR=DIR)")
  for name, value, minimum in (
      ("TRAIN_STEPS", train_steps, 1), ("BATCH_SIZE", batch_size, 1),
      ("LOG_PERIOD", log_period, 1), ("CHECKPOINT_PERIOD", checkpoint_period, 1),
      ("EVAL_STEPS", eval_steps, 1), ("RANDOM_SEED", random_seed, 0)):
    errors.require_int(name, value, minimum)
  if eval_period is not None:
    errors.require_int("EVAL_PERIOD", eval_period)
  policy = nan_policy_lib.NanPolicy(nan_policy, nan_rollback_after)
  if "://" not in str(model_dir):  # orbax needs absolute paths
    model_dir = os.path.abspath(model_dir)
  _check_writable(model_dir)
  loop_config = trainer_lib.LoopConfig(train_steps=train_steps, log_period=log_period,
                                       eval_period=eval_period,
                                       checkpoint_period=checkpoint_period)
  import_task_module(mixture_or_task_module)
  if isinstance(logical_axis_rules, str):
    logical_axis_rules = _validated(lambda: partitioning.logical_axis_rules(logical_axis_rules),
                                    "logical_axis_rules")
  partitioner = _validated(lambda: partitioning.Partitioner(
      mesh_shape, logical_axis_rules, dcn_mesh_shape=dcn_mesh_shape), "MESH_SHAPE")
  process_args = dict(process_index=jax.process_index(), process_count=jax.process_count())
  errors.require_int("num_microbatches", num_microbatches)
  if batch_size % (partitioner.data_parallel_size * num_microbatches):
    raise errors.ConfigError(
        f"BATCH_SIZE={batch_size} is not divisible by the data-parallel size "
        f"{partitioner.data_parallel_size} of MESH_SHAPE times num_microbatches="
        f"{num_microbatches}")
  converter = getattr(model, "feature_converter", "encoder_decoder")
  process_args.update(feature_converter=converter, use_cached=use_cached_tasks,
                      cache_dir=task_cache_dir, num_threads=data_threads)
  trainer = trainer_lib.Trainer(model, optimizer(learning_rate=learning_rate_schedule),
                                learning_rate_schedule, partitioner,
                                num_microbatches=num_microbatches, finetuning=finetuning,
                                skip_nonfinite=policy.skip_in_step)
  # The train step compiles in threads while the pipeline starts (shapes from the lengths);
  # a mistyped task name is reported first, without waiting for a compilation.
  _validated(lambda: sources.get_task(mixture_or_task_name), "training data")
  _start_compile(trainer, converter, task_feature_lengths, batch_size, pack,
                 init=not initial_checkpoint_path and not checkpoints.step_dirs(model_dir))
  try:
    train_feed = _validated(lambda: pipeline.make_feed(
        mixture_or_task_name, train_split, task_feature_lengths, batch_size, objective,
        seed=random_seed, pack=pack, **process_args), "training data")
    _validated(lambda: _check_vocabulary_fits(model, train_feed, objective), "model vocabulary")
    make_eval_feed = None
    if loop_config.eval_period:
      if eval_split not in train_feed.task.splits:
        raise errors.ConfigError(f"task {mixture_or_task_name!r} has no {eval_split!r} split for "
                                 f"evaluation (set EVAL_PERIOD=None to train without eval)")
      make_eval_feed = lambda: pipeline.make_feed(
          mixture_or_task_name, eval_split, task_feature_lengths, batch_size, objective,
          seed=random_seed, num_epochs=1, shuffle=False, **process_args)
    if initial_checkpoint_path:
      _validated(lambda: checkpoints.validate_step_dir(initial_checkpoint_path),
                 "INITIAL_CHECKPOINT_PATH")
    elif require_initial_checkpoint:
      raise errors.ConfigError(
          "this config starts from a checkpoint: pass "
          "--gin.INITIAL_CHECKPOINT_PATH=<MODEL_DIR of the run>/checkpoint_<N>")
    example_batch = _validated(lambda: _first_batch(train_feed), "training data")
    if finetuning is not None:  # The technique meets the parameter tree here (bad groups...).
      abstract_state = _validated(lambda: trainer.abstract_state(example_batch),
                                  f"finetuning={finetuning!r}")
    else:
      abstract_state = trainer.abstract_state(example_batch)
    if initial_checkpoint_path:
      _check_initial_checkpoint(initial_checkpoint_path, abstract_state.params)
    _check_resumable(model_dir, abstract_state.params)
  except BaseException:
    trainer.cancel_compile()  # a configuration error: no wait for the step's compilation
    raise

  # ---- the run: from here on MODEL_DIR is written. ----
  entry.mark_run_started()
  is_main = jax.process_index() == 0
  model_dir = epath.Path(model_dir)
  if is_main:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.gin").write_text(gin.operative_config_str())
  checkpointer = checkpoints.Checkpointer(model_dir, keep=keep_checkpoints,
                                          async_save=async_checkpointing)
  try:
    state = _initial_state(trainer, checkpointer, train_feed, abstract_state, example_batch,
                           initial_checkpoint_path, random_seed, restore_strict)
  except BaseException:  # (e.g. RESTORE_STRICT): close orbax's threads before exiting
    checkpointer.close()
    raise
  resuming = checkpointer.latest_step() is not None  # (after corrupt steps were moved aside)
  if finetuning is not None and initial_checkpoint_path and not resuming:
    params = finetuning.initialize(
        state.params, lambda: trainer.init_state(random_seed, example_batch).params)
    if params is not state.params:
      state = state.replace(params=jax.device_put(params, trainer.state_shardings.params))
  if fresh_optimizer_state and initial_checkpoint_path and not resuming:
    log.info("fresh optimizer state (fresh_optimizer_state=True)")
    state = trainer.state_from_params(state.params, state.step, random_seed)
  start = int(jax.device_get(state.step))
  _log_startup(trainer, state, partitioner, train_feed, start, train_steps, abstract_state)
  if start >= train_steps:
    log.info("already at step %d >= TRAIN_STEPS=%d: nothing to train", start, train_steps)
    train_feed.close()
    checkpointer.close()
    return state

  def run_eval(step, params):
    with make_eval_feed() as eval_feed:
      values = trainer_lib.evaluate(trainer, params, itertools.islice(eval_feed, eval_steps))
    results = {mixture_or_task_name: values}
    if inference_evaluator is not None:
      results.update(inference_evaluator.evaluate(model, params, step,
                                                  model_dir if is_main else None))
    return results

  writer = metrics.MetricsWriter(model_dir, enabled=is_main)
  writer.rewind(start)  # Rows of steps after the restored checkpoint are re-run.
  tokens_per_batch = feature_converters.tokens_per_batch(example_batch) * jax.process_count()
  global_shapes = {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(),) + v.shape[1:],
                                           v.dtype) for k, v in example_batch.items()}
  flop_accounting = flops.accounting(model, global_shapes, dtype=_activation_dtype(model))
  watch = nan_policy_lib.NonFiniteWatch(policy, writer.write_train)
  try:
    with preemption.PreemptionGuard(jax.process_count()) as guard:
      for rollbacks in itertools.count():
        try:
          state = trainer_lib.train_loop(
              trainer, state, train_feed, loop_config, writer, checkpointer,
              run_eval=run_eval if make_eval_feed else None, tokens_per_batch=tokens_per_batch,
              flop_accounting=flop_accounting, guard=guard, watch=watch)
          break
        except nan_policy_lib.RollBack as rollback:
          state = _roll_back(rollback, rollbacks, checkpointer, writer, abstract_state)
  finally:
    train_feed.close()
    writer.close()
    checkpointer.close()
  log.info("done: step %d, checkpoint %s", train_steps,
           checkpoints.step_dir(model_dir, train_steps))
  if hasattr(model, "exports"):
    for name, params in model.exports(state.params).items():  # Every process: orbax
      where = checkpoints.save_params(model_dir / name, train_steps, params)  # saves together.
      log.info("exported %s parameters to %s", name, where)
  if finetuning is not None:
    for where in finetuning.export(state.params, model_dir, train_steps, initial_checkpoint_path):
      log.info("finetuning export: %s", where)
  return state


def _start_compile(trainer, converter: str, feature_lengths: Mapping[str, int],
                   batch_size: int, pack: bool, init: bool) -> None:
  """`trainer.start_compile` for the batches the pipeline will make (global shapes);
  nothing when they cannot be predicted (the pipeline then reports the problem).
  `init`: also compile the initialisation (not when a checkpoint will be restored)."""
  try:
    expected = batch_shapes.expected_batch_shapes(converter, feature_lengths, batch_size, pack)
  except ValueError:
    return
  trainer.start_compile(expected, init=init)


def _activation_dtype(model: Any) -> str:
  """The network's activation dtype name ('float32' when it has none)."""
  try:
    return str(flops.network_config(model).dtype)
  except AttributeError:
    return "float32"


def _roll_back(rollback: nan_policy_lib.RollBack, rollbacks: int, checkpointer, writer,
               abstract_state) -> trainer_lib.TrainState:
  """The train state of the last checkpoint after `nan_rollback_after` bad steps (the
  data goes on from where it is); NonFiniteLoss after MAX_ROLLBACKS or without one."""
  checkpointer.wait()
  latest = checkpointer.latest_step()
  if latest is None or rollbacks >= nan_policy_lib.MAX_ROLLBACKS:
    why = "no checkpoint to roll back to" if latest is None else f"{rollbacks} rollbacks already"
    raise nan_policy_lib.NonFiniteLoss(
        f"{rollback} and {why} (metrics/train.jsonl has the bad steps' rows)")
  log.warning("%s: rolling back to %s (the data continues after step %d)", rollback,
              checkpoints.step_dir(checkpointer.directory, latest), rollback.step)
  state, _ = checkpointer.restore(latest, abstract_state)
  writer.rewind(latest)
  return state


def _initial_state(trainer, checkpointer, train_feed, abstract_state, example_batch,
                   initial_checkpoint_path, random_seed,
                   restore_strict: bool = False) -> trainer_lib.TrainState:
  """Resumes from MODEL_DIR's newest checkpoint (train state and data position), else
  starts from INITIAL_CHECKPOINT_PATH (train state and step; data from the start),
  else initialises from RANDOM_SEED. An INITIAL_CHECKPOINT_PATH with another parameter
  tree (e.g. ELECTRA's discriminator under a classifier head) gives the parameters it
  shares (same path and shape) and its step; the others come from RANDOM_SEED (logged),
  the optimizer state is fresh; a shared path of another shape is a ConfigError."""
  restored = checkpointer.restore_latest(abstract_state, strict=restore_strict)
  if restored is not None:
    latest, state, data_state = restored
    log.info("resuming from %s", checkpoints.step_dir(checkpointer.directory, latest))
    train_feed.set_state(data_state)
    return state
  if initial_checkpoint_path:
    log.info("starting from INITIAL_CHECKPOINT_PATH=%s", initial_checkpoint_path)
    if (checkpoints.peft_info(initial_checkpoint_path) is not None
        or checkpoints.saved_param_shapes(initial_checkpoint_path)
        != checkpoints.flat_shapes(abstract_state.params)):
      # Another parameter tree (a task head, adapters on a pretrained body), or a PEFT
      # checkpoint (its base, then its own parameters): the shared parameters and the
      # step from the checkpoint, the rest from RANDOM_SEED, a fresh optimizer state.
      try:
        restored, missing = checkpoints.restore_matching_params(initial_checkpoint_path,
                                                                abstract_state.params)
      except ValueError as error:
        raise errors.ConfigError(f"INITIAL_CHECKPOINT_PATH: {errors.one_line(error)}") from None
      log.info("%d parameter(s) not in the checkpoint, initialised from RANDOM_SEED=%d: %s",
               len(missing), random_seed, ", ".join(missing))
      from flax import traverse_util  # pylint: disable=g-import-not-at-top
      params = traverse_util.flatten_dict(trainer.init_state(random_seed, example_batch).params)
      params.update(traverse_util.flatten_dict(restored))
      return trainer.state_from_params(traverse_util.unflatten_dict(params),
                                       checkpoints.restore_step(initial_checkpoint_path),
                                       random_seed)
    expected = [(tuple(leaf.shape), str(leaf.dtype))
                for leaf in jax.tree.leaves(abstract_state.opt_state)]
    if checkpoints.saved_leaf_shapes(initial_checkpoint_path, "opt_state") == expected:
      return checkpoints.restore_state_from_path(initial_checkpoint_path, abstract_state)
    log.info("its optimizer state belongs to another optimizer: restoring parameters and "
             "step, with a fresh optimizer state")
    params, step = checkpoints.restore_params_from_path(
        initial_checkpoint_path, abstract_state.params, abstract_state.step)
    return trainer.state_from_params(params, step, random_seed)
  return trainer.init_state(random_seed, example_batch)


def _check_initial_checkpoint(path: str, abstract_params: Any) -> None:
  """A shared parameter of another shape, or none shared, is a ConfigError (before
  anything is written); a model mostly absent from the checkpoint is warned about."""
  wanted = checkpoints.flat_shapes(abstract_params)
  try:
    saved = checkpoints.check_param_shapes(path, wanted)
  except ValueError as error:
    raise errors.ConfigError(f"INITIAL_CHECKPOINT_PATH={errors.one_line(error)}") from None
  size = lambda shape: int(np.prod(shape))
  shared = sum(size(shape) for name, shape in wanted.items() if name in saved)
  total = sum(size(shape) for shape in wanted.values())
  if shared < 0.5 * total:
    log.warning("INITIAL_CHECKPOINT_PATH holds only %.0f%% of the model's parameters; the "
                "rest start from RANDOM_SEED (scanned vs unscanned layers differ in paths)",
                100.0 * shared / total)


def _check_writable(model_dir: str) -> None:
  """MODEL_DIR (local) can be created and written: its nearest existing ancestor is a
  writable directory (checked before anything is written; cloud paths are not checked)."""
  if "://" in str(model_dir):
    return
  path = pathlib.Path(model_dir).absolute()
  for ancestor in (path, *path.parents):
    if ancestor.exists():
      if not ancestor.is_dir():
        raise errors.ConfigError(f"MODEL_DIR={model_dir} cannot be created: {ancestor} is a "
                                 f"file, not a directory (choose another MODEL_DIR)")
      if not os.access(ancestor, os.W_OK | os.X_OK):
        raise errors.ConfigError(f"MODEL_DIR={model_dir} is not writable: no write permission "
                                 f"on {ancestor}")
      return


def _check_resumable(model_dir: str, abstract_params: Any) -> None:
  """The newest readable checkpoint of MODEL_DIR (the one a resume restores) has the
  model's parameter paths and shapes; a ConfigError naming them otherwise."""
  for step, path in checkpoints.step_dirs(model_dir):
    try:
      with checkpoints.quiet_failed_reads():  # A corrupt step's reads print noise.
        saved = checkpoints.saved_param_shapes(path)
    except Exception:  # pylint: disable=broad-except  (unreadable: the restore falls back)
      continue
    wanted = checkpoints.flat_shapes(abstract_params)
    problems = [f"{name}: checkpoint {saved[name]} vs model {shape}"
                for name, shape in wanted.items() if name in saved and saved[name] != shape]
    problems += [f"{name} not in the checkpoint" for name in sorted(set(wanted) - set(saved))]
    problems += [f"{name} not in the model" for name in sorted(set(saved) - set(wanted))]
    if problems:
      raise errors.ConfigError(
          f"MODEL_DIR={model_dir} holds checkpoint_{step} of another architecture: "
          f"{'; '.join(problems[:3])}"
          f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}"
          f" (use a new MODEL_DIR, or INITIAL_CHECKPOINT_PATH to start from it)")
    return


def _check_vocabulary_fits(model, feed, objective) -> None:
  """The model's embedding must cover every id the data can hold."""
  model_vocab = getattr(model, "vocab_size", None)
  if model_vocab is None:
    return
  highest = int(feed.vocabulary.vocab_size) - 1
  if objective is not None:
    highest = max([highest, *objective.extra_token_names(int(feed.vocabulary.vocab_size))])
  if highest >= model_vocab:
    raise ValueError(f"the data holds token ids up to {highest} but the model has "
                     f"{model_vocab} embeddings (bind padded_vocab_size.extra_tokens)")


def _first_batch(feed):
  """The next batch of `feed`, without moving it (shapes for compilation)."""
  state = feed.get_state()
  try:
    batch = next(feed)
  except StopIteration:
    raise ValueError(f"split of {feed.task.name!r} holds no batch of BATCH_SIZE={feed.batch_size}"
                     ) from None
  feed.set_state(state)  # Also closes the iterator opened for this batch.
  return batch


def _log_startup(trainer, state, partitioner, feed, start: int, train_steps: int,
                 abstract_state) -> None:
  log.info("devices: %d x %s (%d process(es)); %s", jax.device_count(),
           jax.devices()[0].device_kind, jax.process_count(), partitioner.describe())
  for module, count in trainer_lib.parameter_summary(state.params):
    log.info("  params %-32s %12s", module, f"{count:,}")
  if trainer.finetuning is not None:
    for line in trainer.finetuning.describe(trainer.boxed_params):
      log.info("finetuning: %s", line)
  trainable, total = selection.count(trainer.boxed_params, trainer.trainable)
  log.info("trainable parameters: %s of %s (%.1f%%)", f"{trainable:,}", f"{total:,}",
           100.0 * trainable / max(total, 1))
  log.info("partitioning plan (parameter, logical axes, mesh axes, global -> per-device shape):")
  for line in partitioner.plan(trainer.boxed_params, abstract_state):
    log.info("  %s", line)
  log.info("task %s: feature lengths %s, global batch %d; steps %d -> %d",
           feed.task.name, feed.feature_lengths, feed.batch_size, start, train_steps)

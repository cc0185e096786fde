"""Validation of a training run: every check before anything is written, as one `TrainPlan`.

`plan_training(...)` checks MODEL_DIR, the periods, the NaN policy, the task
module and name, the mesh and batch size, the model's vocabulary against the
data, INITIAL_CHECKPOINT_PATH and the checkpoints MODEL_DIR already holds,
and that the fine-tuning technique fits the parameter tree. It opens the
data pipeline (reading, not writing) and starts compiling the train step in
background threads while the pipeline starts. A model that holds a frozen
second model (`posttrain.frozen`: a DPO reference, a distillation teacher)
has its vocabulary and checkpoint checked, and the fine-tuning technique
wrapped so that the frozen model stays frozen. Any problem is an
`errors.ConfigError` (one line, exit code 2) and MODEL_DIR is not created.
`train_run.execute(plan)` then runs it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from t5xlike import checkpoints, errors, interfaces, partitioning
from t5xlike.data import batch_shapes, feed_steps, pipeline, task_examples
from t5xlike.objectives.base import Objective
from t5xlike.posttrain import frozen, on_policy as on_policy_lib
from t5xlike.runs import run_config
from t5xlike.trackers import tracker as tracker_lib
from t5xlike.trackers.tracker import Tracker
from t5xlike.training import loop as loop_lib, nan_policy as nan_policy_lib, trainer as trainer_lib
from t5xlike.training.fault_hooks import FaultHooks
from t5xlike.training.state_plan import StatePlan
from t5xlike.training.train_state import TrainState

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainPlan:
  """A validated training run: its configuration and what validation built.

  Attributes:
    model: the model trained.
    model_dir: MODEL_DIR (absolute for a local path).
    train_steps: TRAIN_STEPS, the total step count.
    random_seed: RANDOM_SEED (initialisation, dropout, data order).
    data, evaluation, checkpointing: the run's configuration objects.
    nan_policy: what a NaN / Inf step does.
    finetuning: the fine-tuning technique, or None.
    partitioner: the mesh and logical axis rules.
    trainer: the compiled steps (the train step compiling in background threads).
    loop: the loop's periods.
    train_feed: this process's training batches (opened, not yet read from).
    make_eval_feed: opens a one-epoch feed of the evaluation split (None: no evaluation).
    example_batch: this process's rows of the first training batch (shapes for compilation).
    state_plan: the train state's layout: parameters with their logical axes, which
      train, the shardings and the abstract state.
    trackers: the experiment trackers selected (`t5xlike.trackers`), not yet open.
  """
  model: Any
  model_dir: str
  train_steps: int
  random_seed: int
  data: run_config.DataConfig
  evaluation: run_config.EvalConfig
  checkpointing: run_config.CheckpointConfig
  nan_policy: nan_policy_lib.NanPolicy
  finetuning: interfaces.FineTuningTechnique | None
  partitioner: partitioning.Partitioner
  trainer: trainer_lib.Trainer
  loop: loop_lib.LoopConfig
  train_feed: Any
  make_eval_feed: Callable[[], Any] | None
  example_batch: Mapping[str, np.ndarray]
  state_plan: StatePlan
  trackers: tuple[Tracker, ...] = ()

  @property
  def abstract_state(self) -> TrainState:
    """The train state's shapes, dtypes and shardings."""
    return self.state_plan.abstract_state


def import_task_module(module: str | None) -> None:
  """Imports MIXTURE_OR_TASK_MODULE; a ConfigError when it cannot be imported."""
  try:
    task_examples.import_module(module)
  except ValueError as error:
    raise errors.ConfigError(str(error)) from None


def validated(fn: Callable[[], Any], what: str) -> Any:
  """`fn()`, with a ValueError / TypeError / KeyError turned into a ConfigError about `what`."""
  try:
    return fn()
  except errors.ConfigError:
    raise
  except (ValueError, TypeError, KeyError) as error:
    raise errors.ConfigError(f"{what}: {errors.one_line(error)}") from None


def plan_training(*, model: Any, model_dir: str, train_steps: int, log_period: int,
                  random_seed: int, data: run_config.DataConfig,
                  optimizer: run_config.OptimizerConfig, objective: Objective | None,
                  finetuning: interfaces.FineTuningTechnique | None,
                  evaluation: run_config.EvalConfig,
                  checkpointing: run_config.CheckpointConfig,
                  partitioning_config: run_config.PartitioningConfig,
                  nan_policy: nan_policy_lib.NanPolicy,
                  fault_hooks: FaultHooks | None = None,
                  on_policy: on_policy_lib.OnPolicySampling | None = None,
                  trackers: Sequence[Tracker] = ()) -> TrainPlan:
  """Checks the run (arguments as `train_run.train`'s; `partitioning_config` is its
  `partitioning`) and returns its plan; nothing written."""
  model_dir = _checked_model_dir(model_dir)
  trackers = tracker_lib.checked(trackers, "train_run.train.trackers")
  frozen.check_model(model)  # a teacher / reference of another vocabulary
  finetuning = frozen.technique(model, finetuning)  # its frozen model: no gradient, no state
  loop = _loop_config(train_steps, log_period, random_seed, data, evaluation, checkpointing)
  # Checks that read no data come first: a typo is reported in a second, not after the
  # pipeline has loaded its examples.
  _check_task_and_lengths(data, objective, model.feature_converter)
  _check_starting_point(model_dir, train_steps, checkpointing)
  partitioner = partitioning_config.partitioner()
  optimizer.check_batch(data.batch_size, partitioner.data_parallel_size, "MESH_SHAPE")
  trainer = trainer_lib.Trainer(model, optimizer.build(), optimizer.learning_rate_schedule,
                                partitioner, num_microbatches=optimizer.num_microbatches,
                                finetuning=finetuning, skip_nonfinite=nan_policy.skip_in_step,
                                fault_hooks=fault_hooks)
  # The train step compiles in threads while the pipeline starts (shapes from the lengths).
  _start_compile(trainer, model.feature_converter, data, init=not (
      checkpointing.initial_checkpoint_path or checkpoints.step_dirs(model_dir)))
  try:
    plan = _plan_with_data(model, model_dir, train_steps, random_seed, data, objective,
                           finetuning, evaluation, checkpointing, nan_policy, partitioner,
                           trainer, loop, on_policy)
    return dataclasses.replace(plan, trackers=trackers)
  except BaseException:
    trainer.cancel_compile()  # a configuration error: no wait for the step's compilation
    raise


def _plan_with_data(model, model_dir, train_steps, random_seed, data, objective, finetuning,
                    evaluation, checkpointing, nan_policy, partitioner, trainer, loop,
                    on_policy) -> TrainPlan:
  """The checks that need the data pipeline and the abstract train state."""
  feed_args = dict(feature_converter=model.feature_converter, use_cached=data.use_cached_tasks,
                   cache_dir=data.task_cache_dir, num_threads=data.data_threads,
                   mode_switching=data.mode_switching,
                   process_index=jax.process_index(), process_count=jax.process_count())
  name = data.mixture_or_task_name
  train_feed = validated(lambda: pipeline.make_feed(
      name, data.split, data.task_feature_lengths, data.batch_size, objective,
      seed=random_seed, pack=data.pack, masked_thought=data.masked_thought, **feed_args),
      "training data")
  validated(lambda: _check_vocabulary_fits(model, train_feed, objective, data.masked_thought),
            "model vocabulary")
  if on_policy is not None:  # Samples from the policy every K steps (posttrain.on_policy).
    train_feed = on_policy.wrap(train_feed, model, trainer, data.pack, name)
  make_eval_feed = None
  if loop.eval_period:
    if evaluation.split not in train_feed.task.splits:
      raise errors.ConfigError(f"task {name!r} has no {evaluation.split!r} split for "
                               f"evaluation (set EVAL_PERIOD=None to train without eval)")
    make_eval_feed = lambda: pipeline.make_feed(
        name, evaluation.split, data.task_feature_lengths, data.batch_size, objective,
        seed=random_seed, num_epochs=1, shuffle=False, **feed_args)
    with validated(make_eval_feed, "evaluation data") as eval_feed:  # A full batch at least.
      validated(lambda: _first_batch(eval_feed),
                f"evaluation data (or set EVAL_PERIOD=None; the {evaluation.split!r} split)")
    if evaluation.inference_evaluator is not None:  # Read now: its tasks are checked too.
      validated(evaluation.inference_evaluator.prepare,
                f"the evaluation's tasks ({evaluation.inference_evaluator.mixture_or_task_name!r}"
                f"; set EVAL_MIXTURE_OR_TASK_NAME in runs/finetune.gin)")
  example_batch = validated(lambda: _first_batch(train_feed), "training data")
  # The fine-tuning technique meets the parameter tree here (bad groups...).
  state_plan = validated(lambda: trainer.state_plan(example_batch),
                         f"finetuning={finetuning!r}" if finetuning else "model")
  if not checkpoints.step_dirs(model_dir):  # (a resume restores the frozen model too)
    frozen.check_checkpoint(model, checkpointing.initial_checkpoint_path,
                            state_plan.abstract_state.params)
  if checkpointing.initial_checkpoint_path:
    _check_initial_checkpoint(checkpointing.initial_checkpoint_path,
                              frozen.trained_part(model, state_plan.abstract_state.params))
  _check_resumable(model_dir, state_plan.abstract_state.params)
  return TrainPlan(model=model, model_dir=model_dir, train_steps=train_steps,
                   random_seed=random_seed, data=data, evaluation=evaluation,
                   checkpointing=checkpointing, nan_policy=nan_policy, finetuning=finetuning,
                   partitioner=partitioner, trainer=trainer, loop=loop, train_feed=train_feed,
                   make_eval_feed=make_eval_feed, example_batch=example_batch,
                   state_plan=state_plan)


def _check_task_and_lengths(data: run_config.DataConfig, objective: Objective | None,
                            converter: str) -> None:
  """MIXTURE_OR_TASK_MODULE imports, MIXTURE_OR_TASK_NAME is registered, and each of its
  tasks fits TASK_FEATURE_LENGTHS under the objective (no example is read)."""
  if data.masked_thought is not None:
    data.masked_thought.check_converter(converter)
  import_task_module(data.mixture_or_task_module)
  name = data.mixture_or_task_name
  if not name:
    raise errors.ConfigError("MIXTURE_OR_TASK_NAME is not set")
  tasks = validated(lambda: task_examples.leaf_tasks(name, data.task_cache_dir),
                    "MIXTURE_OR_TASK_NAME")
  for task in tasks:
    try:
      feed_steps.prepare_objective(task, objective, data.task_feature_lengths, converter)
    except ValueError as error:
      raise errors.ConfigError(f"task {task.name!r}: {errors.one_line(error)}") from None


def _check_starting_point(model_dir: str, train_steps: int,
                          checkpointing: run_config.CheckpointConfig) -> None:
  """INITIAL_CHECKPOINT_PATH is a step directory (or required and missing), and a new run
  from it has steps to train: TRAIN_STEPS is the total, counted from its step."""
  initial = checkpointing.initial_checkpoint_path
  if not initial:
    if checkpointing.require_initial_checkpoint:
      raise errors.ConfigError(
          "this config starts from a checkpoint: pass "
          "--gin.INITIAL_CHECKPOINT_PATH=<MODEL_DIR of the run>/checkpoint_<N>")
    return
  validated(lambda: checkpoints.validate_step_dir(initial), "INITIAL_CHECKPOINT_PATH")
  if checkpoints.step_dirs(model_dir):
    return  # A resume: MODEL_DIR's own newest checkpoint counts, not INITIAL_CHECKPOINT_PATH.
  start = int(validated(lambda: checkpoints.restore_step(initial), "INITIAL_CHECKPOINT_PATH"))
  if train_steps <= start:
    raise errors.ConfigError(
        f"TRAIN_STEPS={train_steps} is the total step count, and INITIAL_CHECKPOINT_PATH is "
        f"at step {start}: nothing to train (for {train_steps} more steps pass "
        f"--gin.TRAIN_STEPS={start + train_steps})")


def _checked_model_dir(model_dir: str) -> str:
  """MODEL_DIR, absolute when local (orbax needs it), checked to be creatable."""
  if not model_dir:
    raise errors.ConfigError("MODEL_DIR is not set (pass --gin.MODEL_DIR=DIR)")
  if "://" in str(model_dir):
    return model_dir
  model_dir = os.path.abspath(model_dir)
  _check_writable(model_dir)
  return model_dir


def _loop_config(train_steps: int, log_period: int, random_seed: int, data: run_config.DataConfig,
                 evaluation: run_config.EvalConfig, checkpointing: run_config.CheckpointConfig
                 ) -> loop_lib.LoopConfig:
  """The loop's periods, each checked against its macro's range."""
  for name, value, minimum in (
      ("TRAIN_STEPS", train_steps, 1), ("BATCH_SIZE", data.batch_size, 1),
      ("LOG_PERIOD", log_period, 1), ("CHECKPOINT_PERIOD", checkpointing.period, 1),
      ("EVAL_STEPS", evaluation.steps, 1), ("RANDOM_SEED", random_seed, 0)):
    errors.require_int(name, value, minimum)
  if evaluation.period is not None:
    errors.require_int("EVAL_PERIOD", evaluation.period)
  return loop_lib.LoopConfig(train_steps=train_steps, log_period=log_period,
                                eval_period=evaluation.period,
                                checkpoint_period=checkpointing.period)


def _start_compile(trainer: trainer_lib.Trainer, converter: str, data: run_config.DataConfig,
                   init: bool) -> None:
  """`trainer.start_compile` for the batches the pipeline will make (global shapes);
  nothing when they cannot be predicted (the pipeline then reports the problem).
  `init`: also compile the initialisation (not when a checkpoint will be restored)."""
  try:
    expected = batch_shapes.expected_batch_shapes(converter, data.task_feature_lengths,
                                                  data.batch_size, data.pack)
  except ValueError:
    return
  trainer.start_compile(expected, init=init)


def _check_initial_checkpoint(path: str, abstract_params: Any) -> None:
  """A shared parameter of another shape, or none shared, is a ConfigError (before
  anything is written); a model mostly absent from the checkpoint is warned about."""
  wanted = checkpoints.flat_shapes(abstract_params)
  try:
    saved = checkpoints.check_param_shapes(path, wanted)
  except ValueError as error:
    raise errors.ConfigError(f"INITIAL_CHECKPOINT_PATH={errors.one_line(error)}") from None
  shared = sum(int(np.prod(shape)) for name, shape in wanted.items() if name in saved)
  total = sum(int(np.prod(shape)) for shape in wanted.values())
  if shared < 0.5 * total:
    log.warning("INITIAL_CHECKPOINT_PATH holds only %.0f%% of the model's parameters; the "
                "rest start from RANDOM_SEED (scanned vs unscanned layers differ in paths)",
                100.0 * shared / total)


def _check_writable(model_dir: str) -> None:
  """MODEL_DIR (local) can be created and written: its nearest existing ancestor is a
  writable directory (checked before anything is written)."""
  path = pathlib.Path(model_dir).absolute()
  for ancestor in (path, *path.parents):
    if ancestor.exists():
      if not ancestor.is_dir():
        raise errors.ConfigError(f"MODEL_DIR={model_dir} cannot be created: {ancestor} is a "
                                 f"file, not a directory (choose another MODEL_DIR)")
      if not os.access(ancestor, os.W_OK | os.X_OK):
        raise errors.ConfigError(f"MODEL_DIR={model_dir} is not writable: no write "
                                 f"permission on {ancestor}")
      return


def _check_resumable(model_dir: str, abstract_params: Any) -> None:
  """The newest readable checkpoint of MODEL_DIR (the one a resume restores) has the
  model's parameter paths and shapes; a ConfigError naming them otherwise."""
  for step, path in checkpoints.step_dirs(model_dir):
    try:
      with checkpoints.quiet_failed_reads():  # A corrupt step's reads print noise.
        saved = checkpoints.saved_param_shapes(path)
    except Exception:  # noqa: BLE001  (unreadable: the restore falls back to an older step)
      continue
    wanted = checkpoints.flat_shapes(abstract_params)
    problems = [f"{name}: checkpoint {saved[name]} vs model {shape}"
                for name, shape in wanted.items() if name in saved and saved[name] != shape]
    problems += [f"{name} not in the checkpoint" for name in sorted(set(wanted) - set(saved))]
    problems += [f"{name} not in the model" for name in sorted(set(saved) - set(wanted))]
    if problems:
      more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
      raise errors.ConfigError(
          f"MODEL_DIR={model_dir} holds checkpoint_{step} of another architecture: "
          f"{'; '.join(problems[:3])}{more}"
          f" (use a new MODEL_DIR, or INITIAL_CHECKPOINT_PATH to start from it)")
    return


def _check_vocabulary_fits(model: Any, feed: Any, objective: Objective | None,
                           masked_thought: Any = None) -> None:
  """The model's embedding must cover every id the data can hold (Masked Thought's mask
  token included)."""
  vocab_size = int(feed.vocabulary.vocab_size)
  highest = vocab_size - 1
  if objective is not None:
    highest = max([highest, *objective.extra_token_names(vocab_size)])
  if feed.mode_switching is not None:  # (a special id beyond the embedding)
    feed.mode_switching.check(feed.vocabulary, model.vocab_size)
  if masked_thought is not None and masked_thought.active:
    mask_id = masked_thought.mask_token_id(vocab_size)
    if mask_id >= model.vocab_size:
      raise errors.ConfigError(f"the Masked Thought mask_id {mask_id} is beyond the model's "
                               f"{model.vocab_size} embeddings")
  if highest >= model.vocab_size:
    raise ValueError(f"the data holds token ids up to {highest} but the model has "
                     f"{model.vocab_size} embeddings (bind padded_vocab_size.extra_tokens)")


def _first_batch(feed: Any) -> dict[str, np.ndarray]:
  """The next batch of `feed`, without moving it (shapes for compilation)."""
  state = feed.get_state()
  try:
    batch = next(feed)
  except StopIteration:
    raise ValueError(f"split of {feed.task.name!r} holds no batch of "
                     f"BATCH_SIZE={feed.batch_size}") from None
  feed.set_state(state)  # Also closes the iterator opened for this batch.
  return batch

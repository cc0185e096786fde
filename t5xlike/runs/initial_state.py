"""The train state a run starts from: MODEL_DIR's newest checkpoint, INITIAL_CHECKPOINT_PATH,
or a fresh initialisation; and the state a NaN rollback returns to.

Precedence (as T5X): a resume of MODEL_DIR wins (train state and data
position); else INITIAL_CHECKPOINT_PATH (parameters and step, the optimizer
state when it belongs to the same optimizer and `fresh_optimizer_state` is
not set; the data from the start); else RANDOM_SEED. A fine-tuning
technique's `initialize` and a fresh optimizer state apply only when a run
starts from INITIAL_CHECKPOINT_PATH, never on a resume; a frozen second model
(`posttrain.frozen`) is restored from its checkpoint whenever a run starts,
never on a resume. Where the state came from is logged in one line.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
from flax import traverse_util

from t5xlike import checkpoints, errors, metrics
from t5xlike.posttrain import frozen
from t5xlike.runs.train_plan import TrainPlan
from t5xlike.training import nan_policy as nan_policy_lib
from t5xlike.training.train_state import TrainState

log = logging.getLogger(__name__)


def starting_state(plan: TrainPlan, checkpointer: checkpoints.Checkpointer) -> TrainState:
  """The state the run trains from (see the module docstring), laid out on the mesh; on a
  resume, `plan.train_feed` is moved to the checkpoint's data position. Logs where it
  came from in one line."""
  state, origin, fresh, restored = _restored_or_initial(plan, checkpointer)
  resuming = checkpointer.latest_step() is not None  # (after corrupt steps were moved aside)
  initial = plan.checkpointing.initial_checkpoint_path
  if not resuming and initial:
    trainer = plan.trainer
    if plan.finetuning is not None:
      params = plan.finetuning.initialize(
          state.params, lambda: trainer.init_state(plan.random_seed, plan.example_batch).params,
          restored)
      if params is not state.params:
        shardings = jax.tree.map(lambda leaf: leaf.sharding, plan.abstract_state.params)
        state = state.replace(params=jax.device_put(params, shardings))
        fresh = False  # (an optimizer state such as sparse fine-tuning's holds the values)
    if plan.checkpointing.fresh_optimizer_state and not fresh:
      state = trainer.state_from_params(state.params, state.step, plan.random_seed,
                                        plan.example_batch)
    if plan.checkpointing.continue_data_position:
      try:
        plan.train_feed.set_state(checkpoints.restore_data_state_from_path(initial))
      except (ValueError, KeyError) as error:
        raise errors.ConfigError(f"INITIAL_CHECKPOINT_PATH: continue_data_position: "
                                 f"{errors.one_line(error)}") from None
      origin += "; the data goes on from its position"
  if not resuming:  # A DPO reference / a teacher: from its checkpoint, once.
    state = state.replace(params=frozen.load_frozen(plan.model, state.params,
                                                    plan.abstract_state.params, initial))
  log.info("%s", origin)
  return state


def _restored_or_initial(plan: TrainPlan, checkpointer: checkpoints.Checkpointer
                         ) -> tuple[TrainState, str, bool, frozenset[str]]:
  """(state, where it came from, whether its optimizer state was just initialised from its
  parameters, the '/'-joined paths of the parameters read from a checkpoint).

  Resumes from MODEL_DIR's newest checkpoint (train state and data position), else
  starts from INITIAL_CHECKPOINT_PATH (train state and step; data from the start),
  else initialises from RANDOM_SEED. An INITIAL_CHECKPOINT_PATH with another parameter
  tree (e.g. ELECTRA's discriminator under a classifier head) gives the parameters it
  shares (same path and shape) and its step; the others come from RANDOM_SEED (logged),
  the optimizer state is fresh; a shared path of another shape is a ConfigError. With
  `fresh_optimizer_state` the checkpoint's optimizer state is not read."""
  abstract_state, trainer, seed = plan.abstract_state, plan.trainer, plan.random_seed
  restored = checkpointer.restore_latest(abstract_state, strict=plan.checkpointing.restore_strict)
  if restored is not None:
    latest, state, data_state = restored
    plan.train_feed.set_state(data_state)
    return (state, f"resuming from {checkpoints.step_dir(checkpointer.directory, latest)} "
            f"(train state and data position)", False, _paths(state.params))
  path = plan.checkpointing.initial_checkpoint_path
  if not path:
    return (trainer.init_state(seed, plan.example_batch),
            f"starting from scratch: initialised from RANDOM_SEED={seed}", True, frozenset())
  origin = f"starting from INITIAL_CHECKPOINT_PATH={path}"
  if (checkpoints.peft_info(path) is not None
      or checkpoints.saved_param_shapes(path) != checkpoints.flat_shapes(abstract_state.params)):
    # Another parameter tree (a task head, adapters on a pretrained body), or a PEFT
    # checkpoint (its base, then its own parameters): the shared parameters and the
    # step from the checkpoint, the rest from RANDOM_SEED, a fresh optimizer state.
    try:
      shared, missing = checkpoints.restore_matching_params(path, abstract_state.params)
    except ValueError as error:
      raise errors.ConfigError(f"INITIAL_CHECKPOINT_PATH: {errors.one_line(error)}") from None
    missing = frozen.trained_paths(plan.model, missing)  # (the frozen model comes next)
    if missing:
      log.info("%d parameter(s) not in the checkpoint, initialised from RANDOM_SEED=%d: %s",
               len(missing), seed, ", ".join(missing))
    params = traverse_util.flatten_dict(trainer.init_state(seed, plan.example_batch).params)
    params.update(traverse_util.flatten_dict(shared))
    state = trainer.state_from_params(traverse_util.unflatten_dict(params),
                                      checkpoints.restore_step(path), seed, plan.example_batch)
    return (state, f"{origin} at step {_step(state)}: the parameters it shares with the "
            f"model, a fresh optimizer state", True, _paths(shared))
  if plan.checkpointing.fresh_optimizer_state:
    why = "fresh_optimizer_state=True"
  else:
    expected = checkpoints.leaf_shapes(abstract_state.opt_state)
    if checkpoints.saved_leaf_shapes(path, "opt_state") == expected:
      state = checkpoints.restore_state_from_path(path, abstract_state)
      return (state, f"{origin} at step {_step(state)}: its parameters and optimizer state",
              False, _paths(state.params))
    why = "its optimizer state belongs to another optimizer"
  params, step = checkpoints.restore_params_from_path(path, abstract_state.params,
                                                      abstract_state.step)
  state = trainer.state_from_params(params, step, seed, plan.example_batch)
  return (state, f"{origin} at step {_step(state)}: its parameters, a fresh optimizer state "
          f"({why})", True, _paths(params))


def _paths(params: Any) -> frozenset[str]:
  """The '/'-joined paths of a parameter tree's leaves."""
  return frozenset("/".join(path) for path in traverse_util.flatten_dict(params))


def _step(state: TrainState) -> int:
  return int(jax.device_get(state.step))


def rolled_back_state(rollback: nan_policy_lib.RollBack, rollbacks: int,
                      checkpointer: checkpoints.Checkpointer, writer: metrics.MetricsWriter,
                      abstract_state: TrainState) -> TrainState:
  """The train state of the last checkpoint after `nan_rollback_after` bad steps (the
  data goes on from where it is); NonFiniteLoss after MAX_ROLLBACKS or without one.

  Args:
    rollback: the bad steps that asked for it.
    rollbacks: rollbacks already made in this run.
    checkpointer: MODEL_DIR's checkpoints (waited for, then read).
    writer: its rows after the restored step are rewound.
    abstract_state: the train state's layout (restore target).
  """
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

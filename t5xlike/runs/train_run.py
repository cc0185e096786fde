"""The training run that `python -m t5xlike.train` executes (gin root `train_run.train`).

`train(...)` is `execute(plan_training(...))`: `train_plan.plan_training`
validates everything first and writes nothing (task, lengths, mesh, periods,
initial checkpoint); `execute` then creates MODEL_DIR, writes its
`config.gin`, resumes from its newest checkpoint (or starts from
INITIAL_CHECKPOINT_PATH, or from scratch: `initial_state`), trains to
TRAIN_STEPS with evaluations, checkpoints, NaN rollbacks and signal handling,
and writes what the model and the fine-tuning technique export.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import gin
import jax
from etils import epath

from t5xlike import checkpoints, flops, interfaces, metrics
from t5xlike.cli import entry
from t5xlike.data import feature_converters
from t5xlike.objectives.base import Objective
from t5xlike.posttrain.on_policy import OnPolicySampling
from t5xlike.runs import initial_state, run_config, startup_report
from t5xlike.runs.train_plan import TrainPlan, plan_training
from t5xlike.trackers import tracker as tracker_lib
from t5xlike.training import loop, nan_policy as nan_policy_lib, preemption
from t5xlike.training.fault_hooks import FaultHooks
from t5xlike.training.train_state import TrainState

log = logging.getLogger(__name__)


def train(*, model: interfaces.Model, model_dir: str, train_steps: int,
          data: run_config.DataConfig, optimizer: run_config.OptimizerConfig,
          objective: Objective | None = None,
          finetuning: interfaces.FineTuningTechnique | None = None,
          evaluation: run_config.EvalConfig = run_config.EvalConfig(),
          checkpointing: run_config.CheckpointConfig = run_config.CheckpointConfig(),
          partitioning: run_config.PartitioningConfig = run_config.PartitioningConfig(),
          nan_policy: nan_policy_lib.NanPolicy = nan_policy_lib.NanPolicy(),
          log_period: int = 100, random_seed: int = 0,
          fault_hooks: FaultHooks | None = None,
          on_policy: OnPolicySampling | None = None,
          trackers: Sequence[tracker_lib.Tracker] = ()) -> TrainState:
  """Trains `model` on a seqio task or mixture to TRAIN_STEPS; returns the final state.

  Args:
    model: the model (MODEL).
    model_dir: MODEL_DIR: checkpoints, metrics/, TensorBoard events, config.gin.
    train_steps: TRAIN_STEPS, the total step count (a run from INITIAL_CHECKPOINT_PATH
      continues that checkpoint's step count).
    data: the training task, lengths and batches.
    optimizer: the optax optimizer, its learning-rate schedule, gradient accumulation.
    objective: the pretraining objective applied to the task's examples (None:
      supervised inputs -> targets).
    finetuning: a technique of `t5xlike.finetuning` (e.g. `gin_configs/finetune/llrd.gin`):
      which parameters train and at what rate; it may change the parameters once
      when the run starts from INITIAL_CHECKPOINT_PATH and write exports at the end.
    evaluation: evaluation during training (EVAL_PERIOD, EVAL_STEPS, task metrics).
    checkpointing: CHECKPOINT_PERIOD, INITIAL_CHECKPOINT_PATH, RESTORE_STRICT, ...
    partitioning: MESH_SHAPE, DCN_MESH_SHAPE, LOGICAL_AXIS_RULES.
    nan_policy: what a NaN / Inf step does (NAN_POLICY, NAN_ROLLBACK_AFTER).
    log_period: LOG_PERIOD, steps between logged metrics rows (step 1 and the last
      step are always logged).
    random_seed: RANDOM_SEED: initialisation, dropout and data order.
    fault_hooks: faults injected on purpose: set only by the tests and the fault drill
      (`tests/gin/fault_hooks.gin`).
    on_policy: preference tuning on samples of the policy, every K steps
      (`posttrain.on_policy`; gin_configs/posttrain/dpo_on_policy.gin); None: the task's pairs.
    trackers: experiment trackers that get the metrics rows too, with the operative gin
      (`t5xlike.trackers`; gin_configs/trackers/{wandb,mlflow}.gin); process 0 only.

  A model that is an `interfaces.ExportingModel` (ELECTRA) has its exports written
  to `MODEL_DIR/<name>/checkpoint_<TRAIN_STEPS>` at the end. SIGTERM / SIGINT stop
  the run after a checkpoint of the step reached (`training.preemption`).
  """
  plan = plan_training(model=model, model_dir=model_dir, train_steps=train_steps,
                       log_period=log_period, random_seed=random_seed, data=data,
                       optimizer=optimizer, objective=objective, finetuning=finetuning,
                       evaluation=evaluation, checkpointing=checkpointing,
                       partitioning_config=partitioning, nan_policy=nan_policy,
                       fault_hooks=fault_hooks, on_policy=on_policy, trackers=trackers)
  return execute(plan)


def execute(plan: TrainPlan) -> TrainState:
  """Runs a validated plan: from here on MODEL_DIR is written."""
  entry.mark_run_started()
  model_dir = epath.Path(plan.model_dir)
  if jax.process_index() == 0:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.gin").write_text(gin.operative_config_str())
  hooks = plan.trainer.fault_hooks
  checkpointer = checkpoints.Checkpointer(model_dir, keep=plan.checkpointing.keep,
                                          async_save=plan.checkpointing.async_save,
                                          before_save=hooks.before_save if hooks else None)
  try:
    state = initial_state.starting_state(plan, checkpointer)
  except BaseException:  # (e.g. RESTORE_STRICT): close orbax's threads before exiting
    checkpointer.close()
    plan.train_feed.close()
    raise
  start = int(jax.device_get(state.step))
  summary = startup_report.log_summary(plan, start)
  flop_accounting = _flop_accounting(plan)  # (on CPU, a measured matmul: after the summary)
  startup_report.write_plan(plan, start, summary, flop_accounting, verbose=entry.verbose())
  if start >= plan.train_steps:
    log.info("already at step %d >= TRAIN_STEPS=%d: nothing to train", start, plan.train_steps)
    plan.train_feed.close()
    checkpointer.close()
    return state
  state = _train(plan, state, start, checkpointer, model_dir, flop_accounting)
  log.info("done: step %d, checkpoint %s", plan.train_steps,
           checkpoints.step_dir(model_dir, plan.train_steps))
  _write_exports(plan, state.params, model_dir)
  return state


def _train(plan: TrainPlan, state: TrainState, start: int,
           checkpointer: checkpoints.Checkpointer, model_dir: epath.Path,
           flop_accounting: flops.Accounting | None) -> TrainState:
  """The training loop from `start` to TRAIN_STEPS, rolled back to the last checkpoint
  when the NaN policy asks; closes the feed, the writer and the checkpointer.

  Args:
    plan: the validated run.
    state: the state to train from.
    start: its step.
    checkpointer: MODEL_DIR's checkpoints.
    model_dir: MODEL_DIR.
    flop_accounting: the mfu fields of train.jsonl (None: no FLOP formula).
  """
  try:
    trackers = _open_trackers(plan, model_dir)
  except BaseException:  # (e.g. an unreachable tracking server): close what is open
    plan.train_feed.close()
    checkpointer.close()
    raise
  writer = metrics.MetricsWriter(model_dir, enabled=jax.process_index() == 0,
                                 trackers=trackers)
  writer.rewind(start)  # Rows of steps after the restored checkpoint are re-run.
  tokens_per_batch = (feature_converters.tokens_per_batch(plan.example_batch)
                      * jax.process_count())
  watch = nan_policy_lib.NonFiniteWatch(plan.nan_policy, writer.write_train)
  run_eval = (lambda step, params: _evaluate(plan, step, params, model_dir)
              ) if plan.make_eval_feed else None
  failed = True  # (until the loop returns: the trackers record a failed run)
  try:
    with preemption.PreemptionGuard(jax.process_count()) as guard:
      rollbacks = 0
      while True:
        try:
          state = loop.train_loop(
              plan.trainer, state, plan.train_feed, plan.loop, writer, checkpointer,
              run_eval=run_eval, tokens_per_batch=tokens_per_batch,
              flop_accounting=flop_accounting, guard=guard, watch=watch)
          failed = False
          return state
        except nan_policy_lib.RollBack as rollback:
          state = initial_state.rolled_back_state(rollback, rollbacks, checkpointer, writer,
                                                  plan.abstract_state)
          rollbacks += 1
  finally:
    plan.train_feed.close()
    writer.close(failed=failed)
    checkpointer.close()


def _open_trackers(plan: TrainPlan, model_dir: epath.Path) -> list[tracker_lib.Tracker]:
  """The selected trackers opened for this start (process 0; none elsewhere), with the
  operative gin as the run's config and `config.gin` and `plan.txt` attached."""
  return tracker_lib.open_for(
      plan.trackers, model_dir, lambda: {name: (model_dir / name).read_text()  # (this start's)
                                         for name in ("config.gin", startup_report.PLAN_FILE)})


def _evaluate(plan: TrainPlan, step: int, params: Any,
              model_dir: epath.Path) -> dict[str, dict[str, Any]]:
  """{task: metrics} of one evaluation: loss and accuracy over EVAL_STEPS batches of the
  training task, plus the inference evaluator's task metrics (outputs written by process 0)."""
  assert plan.make_eval_feed is not None
  with plan.make_eval_feed() as eval_feed:
    values = loop.evaluate(plan.trainer, params,
                                  itertools.islice(eval_feed, plan.evaluation.steps))
  results: dict[str, dict[str, Any]] = {str(plan.data.mixture_or_task_name): values}
  evaluator = plan.evaluation.inference_evaluator
  if evaluator is not None:
    results.update(evaluator.evaluate(plan.model, params, step,
                                      model_dir if jax.process_index() == 0 else None))
  return results


def _write_exports(plan: TrainPlan, params: Any, model_dir: epath.Path) -> None:
  """What the model (`interfaces.ExportingModel`) and the fine-tuning technique write
  beside the checkpoints; on every process (orbax saves together)."""
  if isinstance(plan.model, interfaces.ExportingModel):
    for name, exported in plan.model.exports(params).items():
      where = checkpoints.save_params(model_dir / name, plan.train_steps, exported)
      log.info("exported %s parameters to %s", name, where)
  if plan.finetuning is not None:
    for where in plan.finetuning.export(params, model_dir, plan.train_steps,
                                        plan.checkpointing.initial_checkpoint_path):
      log.info("finetuning export: %s", where)


def _flop_accounting(plan: TrainPlan) -> flops.Accounting | None:
  """FLOPs per global step of the model and the peak per device (CPU: measured)."""
  batch = plan.example_batch
  global_shapes = {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(),) + v.shape[1:],
                                           v.dtype) for k, v in batch.items()}
  return flops.accounting(plan.model, global_shapes, dtype=_activation_dtype(plan.model))


def _activation_dtype(model: interfaces.Model) -> str:
  """The network's activation dtype name ('float32' for a model of several networks)."""
  config = flops.network_config(model)
  return "float32" if config is None else str(config.dtype)

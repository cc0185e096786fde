"""The training loop and the loss / accuracy evaluation of a trainer.

`train_loop` trains from `state.step` to TRAIN_STEPS: logging, evaluation,
checkpoints, the NaN watch and the preemption guard at their periods.
`evaluate` sums the eval step's statistics over batches (float64 on host).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax

from t5xlike import checkpoints, interfaces, metrics
from t5xlike.training import nan_policy, preemption
from t5xlike.training.train_state import TrainState
from t5xlike.training.trainer import Batch, Trainer

log = logging.getLogger(__name__)


def evaluate(trainer: Trainer, params: Any, batches: Iterator[Batch]) -> dict[str, float]:
  """Per-token loss / accuracy / z-loss over `batches` (float64 sums on host)."""
  totals: dict[str, float] = {}
  for batch in batches:
    stats = jax.device_get(trainer.eval_stats(params, batch))
    for key, value in stats.items():
      totals[key] = totals.get(key, 0.0) + float(value)
  if not totals:
    raise ValueError("evaluation produced no batch (is the split smaller than one batch?)")
  values = {k: float(v) for k, v in trainer.model.metrics(totals).items()}
  values["loss"] = totals["loss_sum"] / max(totals["weight_sum"], 1.0)
  values["target_tokens"] = int(totals["weight_sum"])
  return values


@dataclasses.dataclass
class LoopConfig:
  """Periods of the training loop, in steps; validated by the run (`train_plan`)."""
  train_steps: int
  log_period: int
  eval_period: int | None  # None: no evaluation
  checkpoint_period: int


def train_loop(trainer: Trainer, state: TrainState, train_batches: interfaces.DataFeed,
               config: LoopConfig,
               writer: metrics.MetricsWriter, checkpointer: checkpoints.Checkpointer,
               run_eval: Callable[[int, Any], Mapping[str, Mapping[str, float]]] | None = None,
               tokens_per_batch: int = 0, flop_accounting: Any = None,
               guard: preemption.PreemptionGuard | None = None,
               watch: nan_policy.NonFiniteWatch | None = None) -> TrainState:
  """Trains from `state.step` to `config.train_steps`; returns the final state.

  Step 1 (or the first step after a resume) and the final step are always
  logged, the final step always evaluated (when eval is configured) and
  checkpointed.

  Args:
    trainer: the compiled steps.
    state: the state to train from (donated to the first step).
    train_batches: this process's rows of successive global batches; its
      `get_state()` is saved with each checkpoint. An `interfaces.PolicySampledFeed`
      is shown the parameters before each step (`observe_policy`).
    config: the periods (steps between logs, evaluations, checkpoints).
    writer: metrics/train.jsonl, eval.jsonl and TensorBoard.
    checkpointer: saves `checkpoint_<step>`.
    run_eval: (step, params) -> {task: metrics}; None: no evaluation.
    tokens_per_batch: tokens of one global batch (tokens_per_second).
    flop_accounting: a `t5xlike.flops.Accounting`: adds `tflops_per_device` and
      `mfu` to every logged step.
    guard: a `preemption.PreemptionGuard`: after a signal the step reached is
      logged and checkpointed, then `preemption.Stopped` is raised.
    watch: applies the NaN policy (default: stop at the first non-finite step).
  """
  if watch is None:
    watch = nan_policy.NonFiniteWatch(nan_policy.NanPolicy(), writer.write_train)
  start = int(jax.device_get(state.step))
  total = config.train_steps
  window_start, window_steps = time.perf_counter(), 0
  run_start = window_start
  for step in range(start + 1, total + 1):
    if isinstance(train_batches, interfaces.PolicySampledFeed):
      # On-policy data (posttrain.on_policy): sampled with the parameters after step - 1.
      train_batches.observe_policy(step - 1, state.params)
    try:
      batch = next(train_batches)
    except StopIteration:
      raise RuntimeError(f"the training data ran out before step {step}") from None
    state, step_metrics = trainer.train_step(state, batch)
    window_steps += 1
    watch.add(step, step_metrics)
    stopping = guard is not None and guard.should_stop(step)
    if step == start + 1 or step % config.log_period == 0 or step == total or stopping:
      watch.check(logged_step=step)
      values = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != "nonfinite"}
      if watch.policy.action == "skip":
        values["skipped_steps"] = watch.skipped
      now = time.perf_counter()
      step_time = (now - window_start) / window_steps
      values.update(step_time_s=step_time,
                    tokens_per_second=tokens_per_batch / step_time if step_time else 0.0)
      if flop_accounting is not None:
        values.update(flop_accounting.fields(step_time))
      values.update(train_batches.metrics())  # loader throughput, packing efficiency
      if step == start + 1:
        values["time_to_first_step_s"] = now - run_start
      writer.write_train(step, values)
      # The first step includes compilation: no ETA from it.
      eta = None if step == start + 1 and step != total else (total - step) * step_time
      log.info(metrics.progress_line(step, total, values, eta_s=eta))
      window_start, window_steps = time.perf_counter(), 0
    is_final = step == total
    if run_eval is not None and config.eval_period and (
        (step % config.eval_period == 0 and not stopping) or is_final):
      watch.check()  # No evaluation of a state that went bad.
      for task, task_values in run_eval(step, state.params).items():
        writer.write_eval(step, task, task_values)
        log.info("eval step %d %s | %s", step, task, " | ".join(
            f"{k} {v:.4g}" for k, v in task_values.items() if isinstance(v, float)))
      window_start, window_steps = time.perf_counter(), 0
    if step % config.checkpoint_period == 0 or is_final or stopping:
      watch.check()  # Never a checkpoint of a state that went bad.
      checkpointer.save(step, state, train_batches.get_state())
    if guard is not None and stopping:
      checkpointer.wait()
      log.info("stopped after step %d: %s", step, checkpoints.step_dir(checkpointer.directory,
                                                                       step))
      raise guard.stopped(step)
  checkpointer.wait()
  return state

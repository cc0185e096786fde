"""What a training run reports before its first step.

On stdout (process 0), a summary of a few lines: the model with its trainable share,
the fine-tuning technique, the devices and mesh, the task, the steps and periods, and
where things are written. The full plan goes to `MODEL_DIR/plan.txt` (process 0, once
the run has started writing, rewritten at every start): the summary, the parameters
per module, every line the technique describes, the partitioning plan per parameter
with the per-device bytes, and the FLOPs per step; `--verbose` prints it too.
"""
from __future__ import annotations

import logging

import jax
from etils import epath

from t5xlike import flops, interfaces
from t5xlike.finetuning import selection
from t5xlike.runs.train_plan import TrainPlan
from t5xlike.training.train_state import parameter_summary

log = logging.getLogger(__name__)

#: The full plan's file under MODEL_DIR.
PLAN_FILE = "plan.txt"


def log_summary(plan: TrainPlan, start: int) -> list[str]:
  """Logs the summary of a run that trains from step `start`; returns its lines."""
  lines = summary(plan, start)
  for line in lines:
    log.info("%s", line)
  return lines


def write_plan(plan: TrainPlan, start: int, summary_lines: list[str],
               accounting: flops.Accounting | None, verbose: bool = False) -> epath.Path:
  """Writes `MODEL_DIR/plan.txt` (process 0): a header, the summary, then `full_plan`;
  logs `full_plan` too when `verbose`. Returns the file's path.

  Args:
    plan: the validated run.
    start: the step it trains from.
    summary_lines: what `log_summary` logged.
    accounting: FLOPs per step (None: the model has no FLOP formula).
    verbose: `--verbose` was given.
  """
  path = epath.Path(plan.model_dir) / PLAN_FILE
  detail = full_plan(plan, accounting)
  if jax.process_index() == 0:
    path.write_text("\n".join([f"training plan of {plan.model_dir}, starting at step {start}",
                               "", *summary_lines, "", *detail, ""]))
  if verbose:
    for line in detail:
      log.info("%s", line)
  return path


def summary(plan: TrainPlan, start: int) -> list[str]:
  """The summary lines (see the module docstring)."""
  feed, loop, boxed = plan.train_feed, plan.loop, plan.state_plan.boxed_params
  trainable, total = selection.count(boxed, plan.state_plan.trainable)
  lines = [f"model {_model_name(plan.model)}; trainable parameters: {trainable:,} of "
           f"{total:,} ({100.0 * trainable / max(total, 1):.1f}%)"]
  if plan.finetuning is not None:
    # A technique's first line sums it up; its indented lines are details (plan.txt).
    lines += [f"finetuning: {line}" for line in plan.finetuning.describe(boxed)
              if not line[:1].isspace()]
  lines.append(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
               f"({jax.process_count()} process(es)); {plan.partitioner.describe()}")
  lines.append(f"task {feed.task.name} ({plan.data.split}): feature lengths "
               f"{dict(feed.feature_lengths)}, global batch {feed.batch_size}")
  evaluation = ("no evaluation" if loop.eval_period is None or plan.make_eval_feed is None
                else f"an evaluation of {plan.evaluation.split} every {loop.eval_period}")
  lines.append(f"steps {start} -> {plan.train_steps}: metrics every {loop.log_period} steps, "
               f"a checkpoint every {loop.checkpoint_period}, {evaluation} (each also at the "
               f"last step)")
  lines.append(f"writing to {plan.model_dir}: checkpoint_<N>/, metrics/, tensorboard/, "
               f"config.gin and {PLAN_FILE}, the full plan (--verbose prints it)")
  return lines


def full_plan(plan: TrainPlan, accounting: flops.Accounting | None) -> list[str]:
  """The lines of `plan.txt` after the summary: parameters per module, the technique,
  the partitioning plan, FLOPs per step."""
  boxed = plan.state_plan.boxed_params
  lines = ["parameters per module:"]
  lines += [f"  {module:40s} {count:>14,}"
            for module, count in parameter_summary(plan.abstract_state.params)]
  if plan.finetuning is not None:
    lines += [f"finetuning: {line}" for line in plan.finetuning.describe(boxed)]
  lines.append("partitioning plan (parameter, logical axes, mesh axes, "
               "global -> per-device shape):")
  lines += [f"  {line}" for line in plan.partitioner.plan(boxed, plan.abstract_state)]
  lines.append(accounting.describe() if accounting is not None else
               f"no FLOP formula for {type(plan.model).__name__}: train.jsonl has no mfu")
  return lines


def _model_name(model: interfaces.Model) -> str:
  """'EncoderDecoderModel (T5Config, float32)': the model class, its network's config
  class and activation dtype (the model class alone for a model of several networks)."""
  config = flops.network_config(model)
  if config is None:
    return type(model).__name__
  return f"{type(model).__name__} ({type(config).__name__}, {config.dtype})"

"""The configuration objects of a run, one per concern, each bound by gin from the T5X macros.

`runs/pretrain.gin` and `runs/finetune.gin` bind them, e.g.

    train_run.train.data = @run_config.DataConfig()
    run_config.DataConfig.batch_size = %BATCH_SIZE

so `--gin.BATCH_SIZE=8` keeps working, and a field without a macro is
overridden by its class name: `--gin.DataConfig.pack=True`,
`--gin.CheckpointConfig.keep=None`, `--gin.OptimizerConfig.num_microbatches=4`.
The objects hold values only; the checks that need the rest of the run
(the mesh, the task, the checkpoint) are made by `train_plan.plan_training`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optax

from t5xlike import errors, partitioning
from t5xlike.inference.task_evaluator import InferenceEvaluator

if TYPE_CHECKING:  # (the data package is imported by the runs that read data)
  from t5xlike.data import masked_thought as masked_thought_lib
  from t5xlike.objectives import mode_switching as mode_switching_lib


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What a run reads: a seqio task or mixture, at fixed lengths, in global batches.

  Attributes:
    mixture_or_task_name: MIXTURE_OR_TASK_NAME (None: no task, e.g. `infer --input`).
    task_feature_lengths: TASK_FEATURE_LENGTHS, tokens per feature ('inputs',
      'targets'; decoder-only tasks: 'targets').
    batch_size: BATCH_SIZE, examples per global batch (all processes together).
    mixture_or_task_module: MIXTURE_OR_TASK_MODULE, imported first (it registers the task).
    split: the split read (training: 'train'; evaluation and inference: 'validation').
    use_cached_tasks: USE_CACHED_TASKS: read task caches (`python -m t5xlike.cache_tasks`).
    task_cache_dir: TASK_CACHE_DIR, where the caches are (None: ~/.cache/t5xlike/tasks).
    pack: several examples per row (segment ids and positions; grain's first-fit packer).
    data_threads: the pipeline's read threads (0: read in the calling thread).
    masked_thought: Masked Thought fine-tuning (`data.masked_thought`, MASKED_THOUGHT_RATE):
      masks the teacher-forced decoder inputs of the training batches (never the
      evaluation's); None or a rate of 0: off.
    mode_switching: UL2 mode switching (`objectives.mode_switching`, MODE_TOKEN,
      TASK_MODE_TOKENS): the paradigm token prepended to each supervised example's
      inputs (training, evaluation, inference); None: none.
  """
  mixture_or_task_name: str | None
  task_feature_lengths: Mapping[str, int]
  batch_size: int
  mixture_or_task_module: str | None = None
  split: str = "train"
  use_cached_tasks: bool = False
  task_cache_dir: str | None = None
  pack: bool = False
  data_threads: int = 0
  masked_thought: masked_thought_lib.MaskedThought | None = None
  mode_switching: mode_switching_lib.ModeSwitching | None = None


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """How parameters are updated.

  Attributes:
    optimizer: an optax optimizer factory (e.g. `optim.adafactor`), called with
      `learning_rate=learning_rate_schedule`.
    learning_rate_schedule: step (int) -> learning rate (e.g. `optim.rsqrt_with_warmup()`).
    num_microbatches: gradient accumulation: each batch is processed in this many
      slices per optimizer step (BATCH_SIZE must divide by it times the data-parallel size).
  """
  optimizer: Callable[..., optax.GradientTransformation]
  learning_rate_schedule: Callable[[Any], Any]
  num_microbatches: int = 1

  def build(self) -> optax.GradientTransformation:
    """The optimizer with its schedule."""
    return self.optimizer(learning_rate=self.learning_rate_schedule)

  def check_batch(self, batch_size: int, data_parallel_size: int, mesh: str) -> None:
    """ConfigError unless BATCH_SIZE splits into `num_microbatches` slices over the mesh's
    data-parallel size (`mesh` names the mesh in the message, e.g. 'MESH_SHAPE')."""
    errors.require_int("num_microbatches", self.num_microbatches)
    if batch_size % (data_parallel_size * self.num_microbatches):
      raise errors.ConfigError(
          f"BATCH_SIZE={batch_size} is not divisible by the data-parallel size "
          f"{data_parallel_size} of {mesh} times num_microbatches={self.num_microbatches}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation during training.

  Attributes:
    period: EVAL_PERIOD, steps between evaluations (None: never; the final step
      is always evaluated when set).
    steps: EVAL_STEPS, batches of `split` per evaluation (loss and accuracy).
    split: the task split evaluated.
    inference_evaluator: adds the tasks' metric functions to every evaluation
      (rows per task in metrics/eval.jsonl, outputs in MODEL_DIR/inference_eval/).
  """
  period: int | None = 1000
  steps: int = 10
  split: str = "validation"
  inference_evaluator: InferenceEvaluator | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Where a run starts from and how it saves.

  Attributes:
    period: CHECKPOINT_PERIOD, steps between checkpoints (the final step is always saved).
    keep: newest checkpoints kept (None: all).
    async_save: write checkpoints in a background thread while training continues.
    initial_checkpoint_path: INITIAL_CHECKPOINT_PATH, a `checkpoint_<N>` step directory
      a new run starts from (parameters and step; the optimizer state when it fits).
    require_initial_checkpoint: a missing INITIAL_CHECKPOINT_PATH is an error (configs
      that only make sense from a checkpoint: fine-tuning, SPDF's dense phase).
    fresh_optimizer_state: start from INITIAL_CHECKPOINT_PATH's parameters and step
      with a new optimizer state (fine-tuning).
    continue_data_position: a new run from INITIAL_CHECKPOINT_PATH also goes on from its
      data position (a branch of the same run on the same task, e.g. a WSD decay:
      `schedules/wsd_decay.gin`) instead of reading the task from its start.
    restore_strict: RESTORE_STRICT: a corrupt newest checkpoint is an error instead
      of a fall-back to the previous one.
  """
  period: int = 1000
  keep: int | None = 3
  async_save: bool = True
  initial_checkpoint_path: str | None = None
  require_initial_checkpoint: bool = False
  fresh_optimizer_state: bool = False
  continue_data_position: bool = False
  restore_strict: bool = False


@dataclasses.dataclass(frozen=True)
class PartitioningConfig:
  """The device mesh and how arrays are laid out on it.

  Attributes:
    mesh_shape: MESH_SHAPE, {axis: size} over 'data', 'fsdp', 'tensor' (-1: the
      remaining devices; None: all devices on 'data').
    dcn_mesh_shape: DCN_MESH_SHAPE, slices per axis over the data-center network
      (multi-slice TPU; None: one slice).
    logical_axis_rules: LOGICAL_AXIS_RULES, a preset name of `t5xlike.partitioning`
      ('data_fsdp_tensor', 'fsdp', 'data_parallel') or explicit rules.
  """
  mesh_shape: Mapping[str, int] | None = None
  dcn_mesh_shape: Mapping[str, int] | None = None
  logical_axis_rules: partitioning.LogicalRules | str = "data_fsdp_tensor"

  def partitioner(self, devices: Sequence[Any] | None = None,
                  dcn_mesh_shape: Mapping[str, int] | None = None) -> partitioning.Partitioner:
    """The mesh over `devices` (default: every process's devices); ConfigError naming the
    bad value. `dcn_mesh_shape` replaces DCN_MESH_SHAPE when given."""
    rules = self.logical_axis_rules
    if isinstance(rules, str):
      try:
        rules = partitioning.logical_axis_rules(rules)
      except (ValueError, KeyError) as error:
        raise errors.ConfigError(f"logical_axis_rules: {errors.one_line(error)}") from None
    try:
      return partitioning.Partitioner(self.mesh_shape, rules, devices=devices,
                                      dcn_mesh_shape=dcn_mesh_shape or self.dcn_mesh_shape)
    except (ValueError, TypeError, KeyError) as error:
      raise errors.ConfigError(f"MESH_SHAPE: {errors.one_line(error)}") from None

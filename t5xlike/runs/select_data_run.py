"""The run that `python -m t5xlike.select_data` executes (gin root `select_data_run.select_data`).

`select_data(...)` is `execute(plan_selection(...))`. The plan checks the
score, k, the name and CHECKPOINT_PATH, reads every example of the split of
MIXTURE_OR_TASK_NAME (each task of a mixture, in order: one pool), loads the
parameters onto the mesh and, for a diversity score, checks that the model
pools its states (nothing written). `execute` scores the pool with the
checkpoint (`inference.example_scores`, batched and compiled like `infer
--mode=score`), chooses k examples (`data.subset_selection`) and writes the
selection (`data.selected_task`): `OUT/NAME/scores.jsonl`, the caches of the
selected tasks, `OUT/NAME/selection.json`.

Scores (`--score`), every one computed on the same pool:
  loss     the k examples with the highest (`--order=lowest`: lowest) mean
           target loss given the inputs (= perplexity order).
  ifd      Instruction-Following Difficulty (loss / loss without the inputs),
           the k highest among IFD <= 1 (Cherry LLM's rule).
  kcenter  k-center greedy over the pooled final states.
  kmeans   k-means clusters of the pooled final states, k shared among them by size.
  random   k uniformly at random (RANDOM_SEED): the baseline.

scores.jsonl, one row per pool example in source order: `index` (in the
pool), `task`, `task_index` (in the task's split), `inputs`, `targets`
(decoded), `target_tokens`, `loss`, `perplexity`, `score` (the summed target
log-likelihood, `infer`'s), `selected`, `rank` (place in the rule's order, or
null), and the rule's own fields: `loss_alone` and `ifd` (+ `ifd_eligible`),
`kcenter_distance`, `cluster` and `cluster_rank`, or `draw`. NaN is written
as null.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from t5xlike import errors, interfaces
from t5xlike.cli import entry
from t5xlike.data import feed_steps, selected_task, subset_selection, task_examples
from t5xlike.inference import checkpoint_loading, example_scores, jsonl_io
from t5xlike.inference.predictor import Predictor, example_features
from t5xlike.runs.run_config import DataConfig, PartitioningConfig

log = logging.getLogger(__name__)

SCORES = ("loss", "ifd", "kcenter", "kmeans", "random")
ORDERS = ("highest", "lowest")
POOLED = ("kcenter", "kmeans")


@dataclasses.dataclass
class PoolTask:
  """One task of the pool.

  Attributes:
    task: the seqio task.
    examples: its split's examples as the source serves them (before EOS).
    model_examples: the same with EOS appended as in training (what is scored).
    rows: decoded {'inputs', 'targets'} text per example.
    copies: {split: examples before EOS} of the other splits copied into the selection.
    eos_features: the features that get EOS after trimming.
  """
  task: Any
  examples: list[dict[str, np.ndarray]]
  model_examples: list[dict[str, np.ndarray]]
  rows: list[dict[str, Any]]
  copies: dict[str, list[dict[str, np.ndarray]]]
  eos_features: tuple[str, ...]


@dataclasses.dataclass
class SelectionPlan:
  """A validated selection: the pool read, the checkpoint loaded.

  Attributes:
    name: the selection's name (`--name`).
    output_dir: the task cache directory written (`--output_dir`).
    score, order: `--score`, `--order`.
    k: the number of examples to choose.
    pool: the tasks of the pool, in the mixture's order.
    predictor: the model and its parameters, batched as BATCH_SIZE.
    step: the checkpoint's step.
    manifest: the fields recorded in selection.json.
    num_clusters: k-means clusters (`--score=kmeans`).
    seed: RANDOM_SEED (k-means, random).
    mixture: whether the source is a mixture.
    split: the split selected from.
  """
  name: str
  output_dir: str
  score: str
  order: str
  k: int
  pool: list[PoolTask]
  predictor: Predictor
  step: int
  manifest: dict[str, Any]
  num_clusters: int
  seed: int
  mixture: bool
  split: str

  @property
  def examples(self) -> list[dict[str, np.ndarray]]:
    """The pool's model examples, task after task."""
    return [ex for task in self.pool for ex in task.model_examples]


def select_data(*, model: interfaces.EmbeddingModel, checkpoint_path: str | None,
                data: DataConfig, score: str = "loss", name: str | None = None,
                output_dir: str | None = None, fraction: float | None = None,
                num_examples: int | None = None, order: str = "highest",
                num_clusters: int = 32, copy_splits: Sequence[str] = ("validation",),
                partitioning: PartitioningConfig = PartitioningConfig(),
                random_seed: int = 0) -> dict[str, Any]:
  """Scores the examples of a task split with CHECKPOINT_PATH, chooses k and writes them
  as a cached task; returns the selection's manifest.

  Args:
    model: the model of the checkpoint (`MODEL`).
    checkpoint_path: CHECKPOINT_PATH, a step directory.
    data: MIXTURE_OR_TASK_NAME / _MODULE and its `split` (the pool),
      TASK_FEATURE_LENGTHS (padded lengths; longer examples are truncated for
      scoring only), BATCH_SIZE (rows per compiled call), USE_CACHED_TASKS and
      TASK_CACHE_DIR (where the pool is read).
    score: 'loss', 'ifd', 'kcenter', 'kmeans' or 'random' (`--score`).
    name: the task (or mixture) name the selection is written as (`--name`).
    output_dir: the task cache directory written into (`--output_dir`).
    fraction: choose floor(fraction * pool size) examples (`--fraction`), or
    num_examples: choose this many (`--num_examples`); exactly one of the two.
    order: 'highest' or 'lowest' score first (loss, ifd).
    num_clusters: k-means clusters (score 'kmeans').
    copy_splits: splits of each source task copied whole into the selection
      (evaluation reads them); those a task lacks are skipped.
    partitioning: the mesh the parameters are laid out on (MESH_SHAPE).
    random_seed: RANDOM_SEED (k-means and random).
  """
  return execute(plan_selection(
      model=model, checkpoint_path=checkpoint_path, data=data, score=score, name=name,
      output_dir=output_dir, fraction=fraction, num_examples=num_examples, order=order,
      num_clusters=num_clusters, copy_splits=copy_splits, partitioning=partitioning,
      random_seed=random_seed))


def _check_flags(score: str, order: str, output_dir: str | None, fraction: float | None,
                 num_examples: int | None, num_clusters: int) -> None:
  if score not in SCORES:
    raise errors.ConfigError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
  if order not in ORDERS:
    raise errors.ConfigError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
  if not output_dir:
    raise errors.ConfigError("--output_dir is required: the task cache directory to write "
                             "(train with TASK_CACHE_DIR set to it)")
  if (fraction is None) == (num_examples is None):
    raise errors.ConfigError("give exactly one of --fraction and --num_examples")
  if fraction is not None and not 0.0 < fraction <= 1.0:
    raise errors.ConfigError(f"--fraction must be in (0, 1], got {fraction}")
  if num_examples is not None:
    errors.require_int("--num_examples", num_examples)
    if num_examples < 1:
      raise errors.ConfigError(f"--num_examples must be >= 1, got {num_examples}")
  errors.require_int("num_clusters", num_clusters)
  if num_clusters < 1:
    raise errors.ConfigError(f"num_clusters must be >= 1, got {num_clusters}")


def plan_selection(*, model: interfaces.EmbeddingModel, checkpoint_path: str | None,
                   data: DataConfig, score: str, name: str | None, output_dir: str | None,
                   fraction: float | None, num_examples: int | None, order: str,
                   num_clusters: int, copy_splits: Sequence[str],
                   partitioning: PartitioningConfig, random_seed: int) -> SelectionPlan:
  """Checks the selection (arguments as `select_data`'s), reads the pool and loads the
  parameters; nothing written. ConfigError (one line) on a problem."""
  _check_flags(score, order, output_dir, fraction, num_examples, num_clusters)
  assert output_dir  # checked above
  checkpoint_path = checkpoint_loading.require_checkpoint_path(checkpoint_path)
  errors.require_int("BATCH_SIZE", data.batch_size)
  if not data.mixture_or_task_name:
    raise errors.ConfigError("MIXTURE_OR_TASK_NAME is not set: the task or mixture to "
                             "select from")
  try:
    task_examples.import_module(data.mixture_or_task_module)
    tasks = task_examples.leaf_tasks(data.mixture_or_task_name, data.task_cache_dir)
  except ValueError as error:
    raise errors.ConfigError(f"MIXTURE_OR_TASK_NAME: {errors.one_line(error)}") from None
  name = selected_task.check_name(name, [task.name for task in tasks])
  if score == "ifd" and any("inputs" not in task.output_features for task in tasks):
    raise errors.ConfigError("--score=ifd compares the targets' loss with and without the "
                             "inputs: every task needs an 'inputs' feature")
  pool = [_read_pool_task(task, data, copy_splits) for task in tasks]
  size = sum(len(task.examples) for task in pool)
  if num_examples is None:
    assert fraction is not None  # _check_flags: exactly one of the two
    k = int(fraction * size)
  else:
    k = num_examples
  if not 1 <= k <= size:
    raise errors.ConfigError(f"k={k} examples to choose, but {data.mixture_or_task_name}/"
                             f"{data.split} holds {size}")
  partitioner = partitioning.partitioner()
  model, params, step = checkpoint_loading.load_model_checkpoint(
      model, checkpoint_path, data.task_feature_lengths, partitioner)
  if score in POOLED:
    _check_pooled_states(model, params, data.task_feature_lengths)
  eos_id = model.vocabulary.eos_id if model.vocabulary is not None else 1
  predictor = Predictor(model, params, data.task_feature_lengths, data.batch_size,
                        eos_id=eos_id, seed=random_seed, progress="select_data")
  manifest = {"source": data.mixture_or_task_name, "module": data.mixture_or_task_module,
              "score": score, "order": order, "k": k, "num_examples": size,
              "checkpoint": str(checkpoint_path), "step": step, "seed": random_seed,
              "feature_lengths": dict(data.task_feature_lengths)}
  if score == "kmeans":
    manifest["num_clusters"] = num_clusters
  mixture = len(tasks) > 1 or tasks[0].name != data.mixture_or_task_name
  return SelectionPlan(name=name, output_dir=output_dir, score=score, order=order, k=k,
                       pool=pool, predictor=predictor, step=step, manifest=manifest,
                       num_clusters=num_clusters, seed=random_seed, mixture=mixture,
                       split=data.split)


def _read_pool_task(task: Any, data: DataConfig, copy_splits: Sequence[str]) -> PoolTask:
  """The split's examples of one task (and the copied splits), or a ConfigError."""
  if data.split not in task.splits:
    raise errors.ConfigError(f"task {task.name!r} has no split {data.split!r}")
  read, eos_features = task_examples.read_source_splits(
      task, [data.split, *copy_splits], use_cached=data.use_cached_tasks,
      cache_dir=data.task_cache_dir)
  examples = read.pop(data.split)
  copies = read
  eos_id = next(iter(task.output_features.values())).vocabulary.eos_id
  model_examples = [feed_steps.append_eos(ex, eos_features, data.task_feature_lengths, eos_id)
                    for ex in examples]
  rows = [task_examples.text_row(task, ex) for ex in examples]
  return PoolTask(task=task, examples=examples, model_examples=model_examples, rows=rows,
                  copies=copies, eos_features=eos_features)


def _check_pooled_states(model: interfaces.EmbeddingModel, params: Any,
                         feature_lengths: Mapping[str, int]) -> None:
  """A ConfigError unless the model pools its final states (traced, not run)."""
  try:
    jax.eval_shape(model.pooled_states, params, example_features(model, feature_lengths))
  except NotImplementedError as error:
    raise errors.ConfigError(f"--score=kcenter/kmeans needs pooled final states: "
                             f"{errors.one_line(error)}; use --score=loss, ifd or random"
                             ) from None


def _second_pass(plan: SelectionPlan, losses: example_scores.TargetLosses
                 ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
  """(IFD fields, pooled states) that the rule needs beyond the loss: a second pass of
  the model over the pool for 'ifd' (without the inputs) and the diversity rules."""
  if plan.score == "ifd":
    # What an empty input becomes: [EOS] where the task appends EOS to its inputs.
    alone: list[dict[str, np.ndarray]] = []
    for task in plan.pool:
      eos = task.task.output_features["inputs"].vocabulary.eos_id
      alone += example_scores.without_inputs(
          task.model_examples, eos if "inputs" in task.eos_features else None)
    loss_alone = example_scores.target_losses(plan.predictor, alone).loss
    return {"loss_alone": loss_alone, "ifd": example_scores.instruction_following_difficulty(
        losses.loss, loss_alone)}, None
  if plan.score in POOLED:
    return {}, example_scores.pooled(plan.predictor, plan.examples)
  return {}, None


def _choose(plan: SelectionPlan, losses: example_scores.TargetLosses,
            fields: Mapping[str, np.ndarray], states: np.ndarray | None
            ) -> subset_selection.Choice:
  """The rule of `plan.score` over the pool."""
  highest = plan.order == "highest"
  if plan.score == "loss":
    return subset_selection.top_k(losses.loss, plan.k, highest)
  if plan.score == "ifd":
    return subset_selection.top_k_ifd(fields["ifd"], plan.k, highest)
  if plan.score == "kcenter":
    assert states is not None  # _second_pass
    return subset_selection.k_center_greedy(states, plan.k)
  if plan.score == "kmeans":
    assert states is not None  # _second_pass
    return subset_selection.k_means_quota(states, plan.k, plan.num_clusters, plan.seed)
  return subset_selection.uniform_random(len(losses.loss), plan.k, plan.seed)


def _json_value(value: Any) -> Any:
  """A NumPy scalar as JSON: NaN / inf as null."""
  value = value.item() if isinstance(value, np.generic) else value
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _score_rows(plan: SelectionPlan, losses: example_scores.TargetLosses,
                choice: subset_selection.Choice) -> list[dict[str, Any]]:
  rank = np.full(len(losses.loss), -1, np.int64)
  rank[choice.indices] = np.arange(len(choice.indices))
  rows = []
  index = 0
  for task in plan.pool:
    for task_index, text in enumerate(task.rows):
      row = {"index": index, "task": task.task.name, "task_index": task_index, **text,
             "target_tokens": int(losses.tokens[index]),
             "loss": _json_value(losses.loss[index]),
             "perplexity": _json_value(losses.perplexity[index]),
             "score": _json_value(losses.log_likelihood[index]),
             "selected": bool(rank[index] >= 0),
             "rank": int(rank[index]) if rank[index] >= 0 else None}
      row.update({key: _json_value(values[index]) for key, values in choice.fields.items()})
      rows.append(row)
      index += 1
  return rows


def execute(plan: SelectionPlan) -> dict[str, Any]:
  """Scores the pool, chooses, writes the selection; returns its manifest."""
  entry.mark_run_started()
  examples = plan.examples
  log.info("choosing %d of %d examples of %s/%s by %s with the checkpoint of step %d -> "
           "%s/%s", plan.k, len(examples), plan.manifest["source"], plan.split, plan.score,
           plan.step, plan.output_dir, plan.name)
  seconds = {}
  start = time.perf_counter()
  losses = example_scores.target_losses(plan.predictor, examples)
  seconds["loss"] = time.perf_counter() - start
  log.info("scored %d examples (%d target tokens) in %.1f s", len(examples),
           int(losses.tokens.sum()), seconds["loss"])
  start = time.perf_counter()
  fields, states = _second_pass(plan, losses)
  if fields or states is not None:
    seconds["ifd" if fields else "pooled_states"] = time.perf_counter() - start
    log.info("%s of %d examples in %.1f s", "losses without inputs" if fields else
             "pooled states", len(examples), time.perf_counter() - start)
  start = time.perf_counter()
  choice = _choose(plan, losses, fields, states)
  choice.fields = {**fields, **choice.fields}
  seconds["choose"] = time.perf_counter() - start
  if len(choice.indices) < plan.k:
    log.warning("%s: only %d examples qualify, fewer than k=%d", plan.score,
                len(choice.indices), plan.k)
  start = time.perf_counter()
  rows = _score_rows(plan, losses, choice)
  root = epath.Path(plan.output_dir)
  jsonl_io.write_jsonl(root / plan.name / selected_task.SCORES, rows)
  selected = np.zeros(len(rows), bool)
  selected[choice.indices] = True
  written, offset = [], 0
  for task in plan.pool:
    keep = np.flatnonzero(selected[offset:offset + len(task.examples)])
    offset += len(task.examples)
    written.append(selected_task.SelectedTask(
        source=task.task.name, splits={plan.split: [task.examples[i] for i in keep],
                                       **task.copies},
        examples=len(task.examples), eos_features=task.eos_features))
  manifest = dict(plan.manifest, num_selected=len(choice.indices),
                  seconds={key: round(value, 3) for key, value in seconds.items()})
  record = selected_task.write(plan.name, root, written, split=plan.split, mixture=plan.mixture,
                               manifest=manifest)
  log.info("%s: %d of %d examples chosen by %s (%s first), written in %.1f s: %s", plan.name,
           len(choice.indices), len(rows), plan.score, plan.order,
           time.perf_counter() - start,
           ", ".join(f"{t['name']} {t['selected']}" for t in record["tasks"]))
  return record

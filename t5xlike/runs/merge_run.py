"""The run behind `python -m t5xlike.merge`: validation, reading, merging, writing.

`merge(...)` (the gin root; `gin_configs/runs/merge.gin`) checks every input
first: each checkpoint is a step directory and all hold the same parameter
paths and shapes as the first (or the base), deltas fit the base, lambdas
match the checkpoints, the output step directory does not exist yet. Any
failure is a `errors.ConfigError` naming the culprit (one line, exit code 2)
and nothing is written. Then it merges one parameter at a time (each input
parameter is read from its checkpoint when needed and dropped after: peak
memory = the merged model + one parameter per input) and writes
`OUTPUT/checkpoint_<step>/state` = `{step, params}` (`checkpoints.save_params`),
which `python -m t5xlike.eval` / `infer` load as CHECKPOINT_PATH with the
model's gin file. `step` is the largest step of the inputs (`step` overrides).

Methods (math in `merging`): 'uniform' (mean of CHECKPOINTS), 'greedy'
(greedy soup ranked and accepted by `evaluator`, a `HeldOutMetric`:
`gin_configs/runs/greedy_soup.gin`), 'task_arithmetic' (BASE + sum_i
lambda_i (theta_i - BASE)), 'breadcrumbs' (BASE + lam * sum_i of the task
vectors masked per row, or per tensor with `breadcrumbs_granularity='tensor'`:
top `beta` and bottom `gamma` by |tau| dropped),
'add_deltas' (BASE + the composed sparse DELTAS, `sparse_delta`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from t5xlike import checkpoints, errors
from t5xlike.cli import entry
from t5xlike.finetuning import merging, sparse_delta
from t5xlike.inference import task_evaluator

log = logging.getLogger(__name__)

METHODS = ("uniform", "greedy", "task_arithmetic", "breadcrumbs", "add_deltas")
#: The methods that take the pretrained checkpoint `--base`.
NEEDS_BASE = ("task_arithmetic", "breadcrumbs", "add_deltas")


def read_params(step_dir: str | epath.Path, names: Sequence[str],
                shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """{name: host float array} of the named parameters of a step directory (the
  others, and the optimizer state, are not read)."""
  item = traverse_util.unflatten_dict(
      {tuple(name.split("/")): np.zeros((), np.float32) for name in names})
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(epath.Path(step_dir) / "state", args=ocp.args.PyTreeRestore(
        item={"params": item}, restore_args={"params": restore_args}, partial_restore=True))
  flat = sparse_delta.flatten(restored["params"])
  for name in names:
    if tuple(flat[name].shape) != tuple(shapes[name]):
      raise ValueError(f"{step_dir}: {name} read with shape {flat[name].shape}")
  return flat


def _same_architecture(reference: str, ref_shapes: Mapping[str, tuple[int, ...]],
                       other: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
  missing = sorted(set(ref_shapes) - set(shapes))
  extra = sorted(set(shapes) - set(ref_shapes))
  if missing or extra:
    where = (f"{missing[0]} is in {reference} but not in {other}" if missing
             else f"{extra[0]} is in {other} but not in {reference}")
    raise errors.ConfigError(f"{other} is not of the architecture of {reference}: parameter "
                             f"{where} ({len(missing)} missing, {len(extra)} extra)")
  for name in sorted(ref_shapes):
    if tuple(ref_shapes[name]) != tuple(shapes[name]):
      raise errors.ConfigError(f"{other} is not of the architecture of {reference}: {name} "
                               f"has shape {tuple(shapes[name])} there, "
                               f"{tuple(ref_shapes[name])} in {reference}")


def _shapes_of(path: str, what: str) -> dict[str, tuple[int, ...]]:
  try:
    return checkpoints.saved_param_shapes(path)
  except (ValueError, FileNotFoundError, OSError) as error:
    raise errors.ConfigError(f"{what} {path}: {errors.one_line(error)}") from None


def _floats(name: str, values: Sequence[float] | float | None, count: int,
            default: float) -> list[float]:
  if values is None:
    return [default] * count
  values = [values] if isinstance(values, (int, float)) else list(values)
  if len(values) == 1:
    values = values * count
  if len(values) != count or not all(math.isfinite(float(v)) for v in values):
    raise errors.ConfigError(f"{name}: {len(values)} value(s) {values} for {count} "
                             f"checkpoint(s) (give one, or one per checkpoint)")
  return [float(v) for v in values]


class HeldOutScore(Protocol):
  """Scores a merged model for the greedy soup (`HeldOutMetric`, or any callable with
  `higher_is_better`)."""
  higher_is_better: bool

  def __call__(self, flat_params: Mapping[str, np.ndarray]) -> float: ...


@dataclasses.dataclass
class MergePlan:
  """A validated merge: the inputs checked against each other, nothing written.

  Attributes:
    method: one of METHODS.
    checkpoint_paths: the step directories merged (`--checkpoints`).
    output: the directory the merged `checkpoint_<step>` is written to.
    base: the pretrained step directory (`--base`), or None.
    deltas: the sparse delta directories (`--deltas`).
    composed: the deltas composed into one (add_deltas), or None.
    shapes: {parameter path: shape} of the architecture.
    lambdas: task arithmetic's scale per checkpoint.
    lam, beta, gamma: Model Breadcrumbs' scale and dropped top / bottom fractions.
    granularity: Model Breadcrumbs' unit of ranking, 'row' or 'tensor'.
    step: the step of the output.
    evaluator: the greedy soup's held-out score, or None.
  """
  method: str
  checkpoint_paths: list[str]
  output: str
  base: str | None
  deltas: list[str]
  composed: sparse_delta.SparseDelta | None
  shapes: dict[str, tuple[int, ...]]
  lambdas: list[float]
  lam: float
  beta: float
  gamma: float
  granularity: str
  step: int
  evaluator: HeldOutScore | None


def merge(*, method: str, checkpoint_paths: Sequence[str] = (), output: str | None = None,
          base: str | None = None, deltas: Sequence[str] = (),
          lambdas: Sequence[float] | None = None, lam: float = 1.0, beta: float = 0.01,
          gamma: float = 0.85, step: int | None = None,
          evaluator: HeldOutScore | None = None,
          breadcrumbs_granularity: str = "row") -> epath.Path:
  """Merges checkpoints (see the module docstring); returns the step directory written.

  Args:
    method: 'uniform', 'greedy', 'task_arithmetic', 'breadcrumbs' or 'add_deltas'.
    checkpoint_paths: the step directories merged (`--checkpoints`).
    output: the directory the merged `checkpoint_<step>` is written to (`--output`).
    base: the pretrained step directory (`--base`): task vectors are theta_i - base,
      deltas are added to it.
    deltas: sparse delta directories (`--deltas`, add_deltas).
    lambdas: task arithmetic: one scale, or one per checkpoint (default 1).
    lam, beta, gamma: Model Breadcrumbs: the scale of the masked sum, the top and the
      bottom fractions of |tau| dropped per layer.
    step: the output's step (default: the inputs' largest).
    evaluator: the greedy soup's held-out score (`runs/greedy_soup.gin`).
    breadcrumbs_granularity: 'row' (along the last axis, the official code) or 'tensor'
      (mergekit's); gin: `--gin.merge_run.merge.breadcrumbs_granularity="'tensor'"`.
  """
  return execute(plan_merge(method=method, checkpoint_paths=checkpoint_paths, output=output,
                            base=base, deltas=deltas, lambdas=lambdas, lam=lam, beta=beta,
                            gamma=gamma, step=step, evaluator=evaluator,
                            granularity=breadcrumbs_granularity))


def plan_merge(*, method: str, checkpoint_paths: Sequence[str], output: str | None,
               base: str | None, deltas: Sequence[str], lambdas: Sequence[float] | None,
               lam: float, beta: float, gamma: float, step: int | None,
               evaluator: HeldOutScore | None, granularity: str = "row") -> MergePlan:
  """Checks every input (arguments as `merge`'s); ConfigError naming the culprit, nothing
  written."""
  paths = [c for c in checkpoint_paths if c]
  output = _check_method(method, paths, output, base, deltas, evaluator)
  if method == "breadcrumbs":
    if granularity not in merging.GRANULARITIES:
      raise errors.ConfigError(f"breadcrumbs_granularity={granularity!r}: expected one of "
                               f"{', '.join(merging.GRANULARITIES)}")
    try:
      merging.layer_counts(100, beta, gamma)
    except ValueError as error:
      raise errors.ConfigError(f"--beta/--gamma: {error}") from None
  reference = base if base and method in NEEDS_BASE else paths[0]
  shapes = _shapes_of(reference, "--base" if reference == base else "--checkpoints")
  for path in paths:
    _same_architecture(reference, shapes, path, _shapes_of(path, "--checkpoints"))
  composed = _composed_deltas(deltas, shapes, base)
  steps = [int(checkpoints.restore_step(p)) for p in paths + ([base] if base else [])]
  steps += [d for d in (sparse_delta.load(p).step for p in deltas) if d is not None]
  step = max(steps) if step is None else errors.require_int("--step", step, 0)
  target = checkpoints.step_dir(output, step)
  if target.exists():
    raise errors.ConfigError(f"--output: {target} exists already (choose another --output)")
  return MergePlan(method=method, checkpoint_paths=paths, output=output, base=base,
                   deltas=list(deltas), composed=composed, shapes=shapes,
                   lambdas=_floats("--lambdas", lambdas, len(paths), 1.0), lam=lam, beta=beta,
                   gamma=gamma, granularity=granularity, step=step, evaluator=evaluator)


def _check_method(method: str, paths: list[str], output: str | None, base: str | None,
                  deltas: Sequence[str], evaluator: HeldOutScore | None) -> str:
  """The inputs each method needs are given; returns `output`."""
  if method not in METHODS:
    raise errors.ConfigError(f"--method={method!r}: expected one of {', '.join(METHODS)}")
  if not output:
    raise errors.ConfigError("--output is not set (the directory the merged checkpoint_<N> "
                             "is written to)")
  if method in NEEDS_BASE and not base:
    raise errors.ConfigError(f"--method={method} needs --base=BASE_CHECKPOINT")
  if method == "add_deltas":
    if not deltas:
      raise errors.ConfigError("--method=add_deltas needs --deltas=DIR[,DIR] (sparse deltas)")
  elif not paths:
    raise errors.ConfigError(f"--method={method} needs --checkpoints=A,B,...")
  if method == "greedy" and evaluator is None:
    raise errors.ConfigError("--method=greedy needs a held-out metric: add "
                             "--gin_file=<model gin> --gin_file=runs/greedy_soup.gin")
  return output


def _composed_deltas(deltas: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
                     base: str | None) -> sparse_delta.SparseDelta | None:
  """The sparse deltas, each checked against the base's shapes, composed into one."""
  composed = None
  for path in deltas:
    try:
      delta = sparse_delta.load(path)
      sparse_delta.check_fits(delta, shapes, f"--deltas {path} vs --base {base}")
    except (ValueError, OSError) as error:
      raise errors.ConfigError(errors.one_line(error)) from None
    if delta.base_checkpoint and base and epath.Path(delta.base_checkpoint) != epath.Path(base):
      log.warning("%s was fine-tuned from %s, added to %s", path, delta.base_checkpoint, base)
    composed = delta if composed is None else sparse_delta.compose(composed, delta)
  return composed


def execute(plan: MergePlan) -> epath.Path:
  """Merges one parameter at a time and writes `OUTPUT/checkpoint_<step>` and merge.json."""
  entry.mark_run_started()
  report: dict[str, Any] = {"method": plan.method, "checkpoints": plan.checkpoint_paths,
                            "base": plan.base, "deltas": plan.deltas, "step": plan.step}
  merged = _merged_params(plan, report)
  written = checkpoints.save_params(plan.output, plan.step, traverse_util.unflatten_dict(
      {tuple(k.split("/")): v for k, v in merged.items()}))
  if jax.process_index() == 0:
    (epath.Path(plan.output) / "merge.json").write_text(json.dumps(report, indent=1) + "\n")
  log.info("wrote %s (%s of %d input(s))", written, plan.method,
           len(plan.checkpoint_paths) + len(plan.deltas))
  return written


def _merged_params(plan: MergePlan, report: dict[str, Any]) -> dict[str, np.ndarray]:
  """{parameter path: merged value} by the plan's method; adds its figures to `report`."""
  names = sorted(plan.shapes)
  if plan.method == "add_deltas":
    assert plan.base is not None and plan.composed is not None  # checked by plan_merge
    report["delta_entries"] = plan.composed.num_entries
    return sparse_delta.apply(read_params(plan.base, names, plan.shapes), plan.composed)
  if plan.method == "greedy":
    assert plan.evaluator is not None  # checked by plan_merge
    evaluator = plan.evaluator
    soup = lambda members: _merge_streaming(
        names, plan.shapes, lambda name, read: merging.uniform_soup([read(p) for p in members]))
    score = lambda members: float(evaluator(soup(members)))
    members, decisions = merging.greedy_soup(plan.checkpoint_paths, lambda p: score([p]), score,
                                             evaluator.higher_is_better)
    for row in decisions:
      log.info("greedy soup: %s alone %.5g, soup with it %.5g: %s", row["name"], row["alone"],
               row["soup_with"], "added" if row["added"] else "skipped")
    report.update(members=members, decisions=decisions)
    return soup(members)

  def one(name: str, read: Callable[[str], np.ndarray]) -> np.ndarray:
    thetas = [read(p) for p in plan.checkpoint_paths]
    if plan.method == "uniform":
      return merging.uniform_soup(thetas)
    assert plan.base is not None  # checked by plan_merge
    if plan.method == "task_arithmetic":
      return merging.task_arithmetic(read(plan.base), thetas, plan.lambdas)
    layered = "layers" in name.split("/")[:-1]  # scanned stack: axis 0 = layers
    return merging.breadcrumbs(read(plan.base), thetas, plan.beta, plan.gamma, plan.lam,
                               plan.granularity, layered)
  breadcrumbs = plan.method == "breadcrumbs"
  report.update(lambdas=plan.lambdas if plan.method == "task_arithmetic" else None,
                beta=plan.beta if breadcrumbs else None,
                gamma=plan.gamma if breadcrumbs else None,
                lam=plan.lam if breadcrumbs else None,
                granularity=plan.granularity if breadcrumbs else None)
  return _merge_streaming(names, plan.shapes, one)


def _merge_streaming(names: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
                     one: Callable[[str, Callable[[str], np.ndarray]], np.ndarray]
                     ) -> dict[str, np.ndarray]:
  """{name: one(name, read)} where read(path) loads that parameter from a checkpoint."""
  merged = {}
  for name in names:
    cache: dict[str, np.ndarray] = {}

    def read(path, name=name, cache=cache):
      if path not in cache:
        cache[path] = read_params(path, [name], shapes)[name]
      return cache[path]
    merged[name] = one(name, read)
  return merged


class HeldOutMetric:
  """A merged model's held-out score for the greedy soup, with the eval machinery.

  `task_evaluator.InferenceEvaluator` on examples [first_example, first_example +
  max_examples) of `split` of each task of MIXTURE_OR_TASK_NAME; the score is
  `metric` averaged over the tasks ('loss': mean target negative log-likelihood per
  token, lower is better; a metric function's name such as 'accuracy': higher is
  better). The reference (mlfoundations/model-soups `main.py`) selects on
  `ImageNet2p`, 2% of ImageNet's training images held out from fine-tuning, and
  reports on the validation set: the examples that select the soup must not be the
  ones its result is reported on. `runs/greedy_soup.gin` therefore selects on the
  validation examples after the first 256, which `runs/eval.gin` (and
  `runs/finetune.gin`'s 128) never read.

  Args:
    model: the model (MODEL of the model gin).
    mixture_or_task_name: whose tasks score the soups.
    task_feature_lengths: TASK_FEATURE_LENGTHS.
    batch_size: examples per compiled call.
    mixture_or_task_module: imported first (registers the tasks).
    split: the split read ('validation', or any split the tasks have).
    first_example: examples of each task before this one are not used.
    max_examples: at most this many examples per task from `first_example` (None: the
      rest of the split).
    metric: the task metric averaged over the tasks.
    higher_is_better: the metric's direction.
    decoding_config: how predictions are decoded (default greedy).
    mesh_shape: recorded only (the evaluation runs on the default devices).
  """

  def __init__(self, model: Any, mixture_or_task_name: str,
               task_feature_lengths: Mapping[str, int], batch_size: int = 32,
               mixture_or_task_module: str | None = None, split: str = "validation",
               max_examples: int | None = 64, metric: str = "loss",
               higher_is_better: bool = False, decoding_config: Any = None,
               mesh_shape: Mapping[str, int] | None = None, first_example: int = 0):
    self.model, self.metric, self.higher_is_better = model, metric, higher_is_better
    self.feature_lengths, self.mesh_shape = dict(task_feature_lengths), mesh_shape
    first = errors.require_int("HeldOutMetric.first_example", first_example, 0)
    try:
      self.evaluator = task_evaluator.InferenceEvaluator(
          mixture_or_task_name, task_feature_lengths, batch_size, split=split,
          max_examples=max_examples, decoding_config=decoding_config,
          mixture_or_task_module=mixture_or_task_module, first_example=first)
      self.evaluator.prepare()  # read here: a bad task is reported before any merging
    except ValueError as error:
      raise errors.ConfigError(f"greedy soup metric: {errors.one_line(error)}") from None
    self.calls = 0

  def __call__(self, flat_params: Mapping[str, np.ndarray]) -> float:
    params = traverse_util.unflatten_dict({tuple(k.split("/")): jax.numpy.asarray(v)
                                           for k, v in flat_params.items()})
    results = self.evaluator.evaluate(self.model, params, self.calls)
    self.calls += 1
    values = [r[self.metric] for r in results.values() if self.metric in r]
    if not values:
      raise ValueError(f"no task reports the metric {self.metric!r} (tasks report: "
                       f"{sorted({k for r in results.values() for k in r})})")
    return float(np.mean(values))

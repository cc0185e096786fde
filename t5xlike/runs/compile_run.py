"""The run of `python -m t5xlike.compile`: the train step of a gin-configured run, compiled
for a TPU slice or GPU node that is not here, and its per-chip report.

`compile_step(topology, num_slices)` is `execute(plan_compile(...))`.
`plan_compile` reads what `train_run.train` would be given by the loaded gin
files (model, data, optimizer, partitioning, fine-tuning, NaN policy:
`train_arguments`), makes the target's compile-only devices
(`aot.targets`), the mesh over them (MESH_SHAPE inside a slice,
DCN_MESH_SHAPE or `--num_slices` across slices), the batch shapes the data
pipeline would produce (`data.batch_shapes`, as the background compilation
of a training run predicts them) and the trainer; any problem is an
`errors.ConfigError` (one line, exit 2). `execute` lowers and compiles
exactly the step `Trainer.train_step` would run (same model, optimizer,
rules, scan / remat, micro-batches, attention kernel) and returns the
`aot.step_report.StepReport`. Nothing is written (but the optimised HLO
when `--dump_hlo` asks for it); no data is read.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import pathlib
import time
from typing import Any

import gin
import jax

from t5xlike import errors, flops, interfaces, library_compat, partitioning
from t5xlike.aot import depth_probe, step_report, targets
from t5xlike.data import batch_shapes as batch_shapes_lib
from t5xlike.models import attention
from t5xlike.runs import run_config, train_run
from t5xlike.training import nan_policy as nan_policy_lib, trainer as trainer_lib

log = logging.getLogger(__name__)

#: `--estimate`: the step time (GPU: the roofline's HBM term) from the scanned step's loops
#: scaled by their trip counts ('loops', `aot.step_report`), or from the unrolled step at
#: two shallow depths ('probe', `aot.depth_probe`: two or three more compilations); 'auto':
#: 'loops' on TPUs, 'probe' on GPUs (cheap compiles; XLA's GPU bytes have no per-kernel
#: cycles to scale the loops by) unless the model has no single network to probe.
ESTIMATES = ("auto", "loops", "probe")
#: The arguments of `train_run.train` that decide the train step.
STEP_ARGUMENTS = ("model", "data", "optimizer", "partitioning", "finetuning", "nan_policy")


@dataclasses.dataclass
class CompilePlan:
  """A validated compilation: the target, the mesh over its devices, the step's inputs.

  Attributes:
    target: the TPU slice(s) or GPU host(s) compiled for.
    devices: their compile-only devices.
    model: the configured model.
    optimizer: the configured optimizer (with its micro-batches).
    partitioner: the mesh over `devices` and the logical axis rules.
    rules: the rules' preset name, or 'custom'.
    trainer: the trainer whose step is compiled.
    batch_shapes: the global batch's shapes.
    dcn_mesh: mesh axis -> slices (hosts) over the data-center network; empty for one.
    finetuning: the configured fine-tuning technique (None: all parameters train).
    skip_nonfinite: the NaN policy skips non-finite updates inside the step.
  """
  target: targets.Target
  devices: list[Any]
  model: interfaces.Model
  optimizer: run_config.OptimizerConfig
  partitioner: partitioning.Partitioner
  rules: str
  trainer: trainer_lib.Trainer
  batch_shapes: dict[str, jax.ShapeDtypeStruct]
  dcn_mesh: dict[str, int]
  finetuning: Any = None
  skip_nonfinite: bool = False

  def trainer_for(self, model: interfaces.Model) -> trainer_lib.Trainer:
    """A trainer of `model` with the plan's optimizer, mesh, rules and fine-tuning, its
    state planned for the plan's batch (`planned_trainer`)."""
    return planned_trainer(model, self.optimizer, self.partitioner, self.batch_shapes,
                           self.finetuning, self.skip_nonfinite)


def planned_trainer(model: interfaces.Model, optimizer: run_config.OptimizerConfig,
                    partitioner: partitioning.Partitioner,
                    shapes: dict[str, jax.ShapeDtypeStruct], finetuning: Any,
                    skip_nonfinite: bool) -> trainer_lib.Trainer:
  """The trainer of `model` whose state is planned for batches of `shapes`. The model's
  kernels resolve for the target's platform (the abstract mesh's); eager work (the init
  key) stays on this host's CPU. A model that cannot be built is an `errors.ConfigError`."""
  trainer = trainer_lib.Trainer(model, optimizer.build(), optimizer.learning_rate_schedule,
                                partitioner, num_microbatches=optimizer.num_microbatches,
                                finetuning=finetuning, skip_nonfinite=skip_nonfinite)
  try:
    with jax.sharding.use_abstract_mesh(partitioner.mesh.abstract_mesh):
      trainer.state_plan(shapes)
  except (ValueError, TypeError, KeyError) as error:
    raise errors.ConfigError(f"model: {errors.one_line(error)}") from None
  return trainer


def _evaluated(value: Any) -> Any:
  """A gin binding as the configurable would receive it: references called (`@X()`) or
  passed as functions (`@X`), inside lists, tuples and dicts too."""
  if isinstance(value, gin.config.ConfigurableReference):
    return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
  if isinstance(value, (list, tuple)):
    return type(value)(_evaluated(v) for v in value)
  if isinstance(value, dict):
    return {k: _evaluated(v) for k, v in value.items()}
  return value


def gin_arguments(function: Any, names: tuple[str, ...]) -> dict[str, Any]:
  """The arguments `names` the loaded gin files give `function` (a run: `train_run.train`,
  `infer_run.infer`; its defaults where they bind none), built as gin would build them."""
  defaults = inspect.signature(function).parameters
  qualified = f"{function.__module__.rsplit('.', 1)[-1]}.{function.__name__}"
  arguments = {}
  for name in names:
    try:
      value = gin.query_parameter(f"{qualified}.{name}")
    except ValueError:
      if defaults[name].default is inspect.Parameter.empty:
        raise errors.ConfigError(f"the gin files bind no {qualified}.{name} (give "
                                 f"the --gin_file of a {function.__name__} run)") from None
      value = defaults[name].default
    arguments[name] = _evaluated(value)
  return arguments


def train_arguments(names: tuple[str, ...] = STEP_ARGUMENTS) -> dict[str, Any]:
  """The arguments the loaded gin files give `train_run.train` (`gin_arguments`)."""
  return gin_arguments(train_run.train, names)


def _dcn_mesh_shape(config: run_config.PartitioningConfig,
                    target: targets.Target) -> dict[str, int] | None:
  """DCN_MESH_SHAPE, or `{'data': slices}` for several slices (hosts) without one."""
  granules = target.num_slices if target.chip.platform == "tpu" else target.shape[0]
  dcn = dict(config.dcn_mesh_shape or {})
  if not dcn:
    return {"data": granules} if granules > 1 and target.chip.platform == "tpu" else None
  product = math.prod(size for size in dcn.values() if size > 0)
  if -1 not in dcn.values() and product != granules:
    what = "--num_slices" if target.chip.platform == "tpu" else "hosts"
    raise errors.ConfigError(f"DCN_MESH_SHAPE={dcn} spans {product} slices but {target.name} "
                             f"has {granules} ({what})")
  return dcn


def parse_target(topology: str, num_slices: int) -> targets.Target:
  """The `--topology` / `--num_slices` target; `errors.ConfigError` for an unknown one or a
  compiler that is not installed."""
  try:
    target = targets.parse_target(topology, num_slices)
  except ValueError as error:
    raise errors.ConfigError(f"--topology: {errors.one_line(error)}") from None
  missing = targets.missing_support(target)
  if missing:
    raise errors.ConfigError(missing)
  return target


def target_mesh(target: targets.Target, config: run_config.PartitioningConfig
                ) -> tuple[list[Any], partitioning.Partitioner, dict[str, int] | None]:
  """(the target's compile-only devices, the configured mesh and rules over them, the DCN
  mesh shape or None)."""
  try:
    devices = targets.compile_devices(target)
  except ValueError as error:
    raise errors.ConfigError(errors.one_line(error)) from None
  dcn_mesh = _dcn_mesh_shape(config, target)
  return devices, config.partitioner(devices, dcn_mesh), dcn_mesh


def plan_compile(topology: str, num_slices: int = 1) -> CompilePlan:
  """Checks the configured run against the target and returns the plan; nothing written.

  Args:
    topology: `--topology` (`aot.targets.FORMS`).
    num_slices: `--num_slices`, TPU slices over DCN.
  """
  target = parse_target(topology, num_slices)
  arguments = train_arguments()
  model, data = arguments["model"], arguments["data"]
  optimizer: run_config.OptimizerConfig = arguments["optimizer"]
  config: run_config.PartitioningConfig = arguments["partitioning"]
  nan_policy: nan_policy_lib.NanPolicy = arguments["nan_policy"]
  devices, partitioner, dcn_mesh = target_mesh(target, config)
  optimizer.check_batch(data.batch_size, partitioner.data_parallel_size,
                        f"the mesh on {target.name}")
  try:
    shapes = batch_shapes_lib.expected_batch_shapes(
        model.feature_converter, data.task_feature_lengths, data.batch_size, data.pack)
  except ValueError as error:
    raise errors.ConfigError(f"TASK_FEATURE_LENGTHS: {errors.one_line(error)}") from None
  trainer = planned_trainer(model, optimizer, partitioner, shapes, arguments["finetuning"],
                            nan_policy.skip_in_step)
  rules = config.logical_axis_rules
  return CompilePlan(target=target, devices=devices, model=model, optimizer=optimizer,
                     partitioner=partitioner,
                     rules=rules if isinstance(rules, str) else "custom", trainer=trainer,
                     batch_shapes=shapes, dcn_mesh=dict(dcn_mesh or {}),
                     finetuning=arguments["finetuning"],
                     skip_nonfinite=nan_policy.skip_in_step)


def model_name(model: interfaces.Model) -> str:
  """'T5Config d_model=768 heads=12x64 layers=12+12 mlp=2048 bfloat16 scan remat=full'."""
  cfg = flops.network_config(model)
  if cfg is None:
    return type(model).__name__
  fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  layers = (f"{fields['num_encoder_layers']}+{fields['num_decoder_layers']}"
            if "num_encoder_layers" in fields else str(fields.get("num_layers", "?")))
  kv = fields.get("num_kv_heads")
  heads = f"{fields['num_heads']}x{fields['head_dim']}" + (f" kv={kv}" if kv else "")
  scan = " scan" if fields.get("scan_layers") else ""
  return (f"{type(cfg).__name__} d_model={fields['emb_dim']} heads={heads} layers={layers} "
          f"mlp={fields['mlp_dim']} vocab={fields['vocab_size']} {fields['dtype']}{scan} "
          f"remat={fields.get('remat_policy', 'none')}")


def figures(plan: CompilePlan) -> step_report.StepFigures:
  """What the report needs besides the compiled step: shapes, analytic bytes and FLOPs."""
  state = plan.trainer.abstract_state(plan.batch_shapes)
  batch = {name: jax.ShapeDtypeStruct(shape.shape, shape.dtype,
                                      sharding=plan.partitioner.batch_sharding())
           for name, shape in plan.batch_shapes.items()}
  step_flops = flops.model_step_flops(plan.model, plan.batch_shapes)
  tokens = sum(math.prod(plan.batch_shapes[name].shape)
               for name in ("encoder_input_tokens", "decoder_target_tokens")
               if name in plan.batch_shapes)
  cfg = flops.network_config(plan.model)
  return step_report.StepFigures(
      model_name=model_name(plan.model), mesh=dict(plan.partitioner.mesh.shape),
      dcn_mesh=plan.dcn_mesh, rules=plan.rules,
      batch_shapes={k: tuple(v.shape) for k, v in plan.batch_shapes.items()},
      tokens_per_step=int(tokens), num_microbatches=plan.optimizer.num_microbatches,
      attention_impl=str(getattr(cfg, "attention_impl", "einsum")) if cfg else "einsum",
      params_bytes=step_report.sharded_bytes(state.params),
      opt_state_bytes=step_report.sharded_bytes(state.opt_state),
      batch_bytes=step_report.sharded_bytes(batch),
      model_flops=step_flops.model if step_flops else None,
      hardware_flops=step_flops.hardware if step_flops else None)


class _Collect(logging.Handler):
  """Keeps the messages of the records it handles."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.messages: list[str] = []

  def emit(self, record: logging.LogRecord) -> None:
    self.messages.append(record.getMessage())


def execute(plan: CompilePlan, hlo_path: str | None = None) -> step_report.StepReport:
  """Lowers and compiles the planned step for the target; returns its report (with the
  attention kernels' fallbacks logged while the step was traced). `hlo_path`: also
  write the optimised HLO text there (`--dump_hlo`)."""
  log.info("compiling the train step for %s: %s", plan.target.describe(),
           plan.partitioner.describe())
  fallbacks = _Collect()
  attention_log = logging.getLogger(attention.__name__)
  attention_log.addHandler(fallbacks)
  try:
    lowered = plan.trainer.lower_train_step(plan.batch_shapes)
  finally:
    attention_log.removeHandler(fallbacks)
  result = _compiled_report(plan, lowered, hlo_path)
  return dataclasses.replace(result, attention_fallbacks=tuple(fallbacks.messages))


def _compiled_report(plan: CompilePlan, lowered: Any,
                     hlo_path: str | None) -> step_report.StepReport:
  """The report of the lowered step, compiled now (or refused for lack of memory)."""
  start, cpu_start = time.perf_counter(), time.process_time()
  device_kind = plan.devices[0].device_kind
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    message = errors.one_line(error)
    if not message.startswith("RESOURCE_EXHAUSTED"):
      raise errors.RunError(f"the compiler refused the step for {plan.target.name}: "
                            f"{message[:300]}") from None
    # Too large for the chip: a report that says so, not a crash.
    return step_report.StepReport.refused_for_memory(
        message, plan.target, figures(plan), device_kind=device_kind,
        compile_seconds=time.perf_counter() - start,
        compile_cpu_seconds=time.process_time() - cpu_start)
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  gpu_cost = None
  if plan.target.chip.platform == "gpu":
    gpu_cost = library_compat.hlo_cost_analysis_on_cpu(compiled)
  if hlo_path:
    pathlib.Path(hlo_path).write_text(compiled.as_text())
  return step_report.StepReport.from_compiled(
      compiled, plan.target, figures(plan), device_kind=device_kind,
      compile_seconds=wall, compile_cpu_seconds=cpu, gpu_cost=gpu_cost)


def probe_points(plan: CompilePlan) -> tuple[dict[str, int], list[dict[str, int]]]:
  """(the network's stack depths, the shallow depths to probe) for `--estimate=probe`;
  `errors.ConfigError` for a model without a single network (ELECTRA)."""
  try:
    depths = depth_probe.stack_depths(plan.model)
  except ValueError as error:
    raise errors.ConfigError(f"--estimate=probe: {error}") from None
  return depths, depth_probe.probe_points(depths)


def probe_depths(plan: CompilePlan, depths: dict[str, int],
                 points: list[dict[str, int]]) -> step_report.DepthProbe:
  """The step time from the unrolled step at the shallow depths `points`
  (`aot.depth_probe`): each probe is the planned step with fewer layers and
  `scan_layers=False`, compiled and priced by libtpu's cost model (TPU) or, on GPUs,
  timed by its HBM traffic (XLA's bytes accessed, exact without loops, times the
  micro-batches) at the chip's HBM bandwidth. `errors.RunError` where a probe gets
  no estimate."""
  gpu = plan.target.chip.platform == "gpu"
  seconds, compile_seconds = [], 0.0
  for point in points:
    model = depth_probe.with_depth(plan.model, point)
    log.info("depth probe: compiling the step unrolled at %s", point)
    probe = dataclasses.replace(plan, model=model, trainer=plan.trainer_for(model))
    report = _compiled_report(probe, probe.trainer.lower_train_step(plan.batch_shapes), None)
    figure = report.step_seconds
    if gpu and report.bytes_accessed:
      figure = (report.bytes_accessed * report.figures.num_microbatches
                / plan.target.chip.hbm_bytes_per_s)
    if not figure:
      raise errors.RunError(f"depth probe {point}: no estimate ({report.estimate_source})")
    seconds.append(figure)
    compile_seconds += report.compile_seconds
  return step_report.DepthProbe(
      depths=depths, points=tuple(points), seconds=tuple(seconds),
      step_seconds=depth_probe.extrapolate(depths, points, seconds),
      compile_seconds=compile_seconds, term="hbm" if gpu else "step")


def compile_step(topology: str, num_slices: int = 1, hlo_path: str | None = None,
                 estimate: str = "auto") -> step_report.StepReport:
  """The report of the configured step compiled for `topology` (`execute`); with
  `estimate='probe'` (on GPUs also 'auto') its step time is `probe_depths`' (`--estimate`)."""
  if estimate not in ESTIMATES:
    raise errors.ConfigError(f"--estimate must be one of {ESTIMATES}, got {estimate!r}")
  plan = plan_compile(topology, num_slices)
  probe = None
  if estimate == "probe" or (estimate == "auto" and plan.target.chip.platform == "gpu"):
    try:
      probe = probe_points(plan)  # checked before compiling
    except errors.ConfigError:
      if estimate == "probe":
        raise
      log.info("no depth probe for this model: the loops are scaled instead")
  report = execute(plan, hlo_path)
  if probe is not None and not report.out_of_memory:
    report = report.with_probe(probe_depths(plan, *probe))
  return report


def print_report(report: step_report.StepReport, as_json: bool) -> None:
  """The table (unless `as_json`), then the JSON line, on stdout."""
  if not as_json:
    print(report.table())
  print(report.json_line(), flush=True)

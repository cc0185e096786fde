"""Train state, jit-compiled train/eval steps and the training loop.

The trainer knows a *model* (network + loss, e.g. `EncoderDecoderModel`), an
optax optimizer with its schedule and a `Partitioner`; objectives live in the
data pipeline and never branch the trainer. Steps count completed optimizer
updates from 1; `TrainState.step` is the number of completed updates.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5xlike import checkpoints, errors, metrics, optim, partitioning
from t5xlike.training import fault_injection, nan_policy, preemption

log = logging.getLogger(__name__)
Batch = Mapping[str, np.ndarray]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint restores.

  Attributes:
    step: int32 scalar, completed optimizer steps.
    params: the model parameters (float32 tree).
    opt_state: the optax optimizer state.
    rng: uint32 [2] raw key; dropout at step s uses fold_in(rng, s).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


#: Per platform, XLA options of the init computation. On CPU, LLVM's -O2 spends
#: ~4 CPU-s on t5x_tiny's init (threefry bits for every parameter: ~50 ms of
#: codegen per parameter) for a program that runs once in 0.01 s; at level 0
#: it compiles in ~2.5 CPU-s and runs in 0.04 s. The samples are the same up
#: to rounding (-O2 contracts multiply-adds into FMAs: ~5% of the values
#: differ in their last bit; tests/test_trainer.py).
_INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def _abstract(batch: Batch) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in batch.items()}


def _global_shapes(batch: Batch) -> dict[str, jax.ShapeDtypeStruct]:
  """This process's rows of a batch -> the global batch's shapes."""
  return {k: jax.ShapeDtypeStruct((np.shape(v)[0] * jax.process_count(),) + np.shape(v)[1:],
                                  v.dtype) for k, v in batch.items()}


def _shape_key(shapes: Mapping[str, jax.ShapeDtypeStruct]) -> tuple:
  return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in shapes.items()))


def parameter_summary(params: Any) -> list[tuple[str, int]]:
  """(module path, parameter count) per top-level module and layer, plus the total."""
  counts: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [getattr(k, "key", str(k)) for k in path]
    module = "/".join(keys[:2]) if len(keys) > 2 else keys[0]
    counts[module] = counts.get(module, 0) + int(np.prod(leaf.shape))
  rows = sorted(counts.items())
  rows.append(("total", sum(counts.values())))
  return rows


def _stop_untrained(params: Any, trainable: Any) -> Any:
  """`params` with no gradient flowing to the parameters (layers, along the
  leading axes) outside `trainable` (bool arrays per leaf; None: all train)."""
  if trainable is None:
    return params

  def stop(p, mask):
    mask = np.asarray(mask, bool)
    if mask.all():
      return p
    if not mask.any():
      return jax.lax.stop_gradient(p)
    mask = mask.reshape(mask.shape + (1,) * (p.ndim - mask.ndim))
    return jnp.where(mask, p, jax.lax.stop_gradient(p))
  return jax.tree.map(stop, params, trainable)


class Trainer:
  """Compiles and runs the train and eval steps of one model on one mesh.

  Args:
    model: provides `init(rng, batch)` (boxed variables),
      `loss_fn(params, batch, dropout_rng) -> (loss, stats)` with stats summed
      over the batch (at least `loss_sum` and `weight_sum`: the loss is
      `loss_sum / weight_sum`), and `metrics(sums)`, the reported metrics
      (e.g. accuracy) from stats summed over one or more batches.
    optimizer: optax transformation (already holding the schedule).
    learning_rate_schedule: the same schedule, evaluated for logging.
    partitioner: the mesh and logical axis rules.
    num_microbatches: gradient accumulation: the batch is processed in this
      many micro-batches per optimizer step.
    finetuning: None, or a fine-tuning technique (`t5xlike.finetuning.base`):
      once the parameter tree is known its `wrap_optimizer` wraps the
      (per-layer) optimizer and its `trainable` mask decides which
      parameters (layers of scanned leaves) get gradients.
    skip_nonfinite: a step whose loss or gradient norm is NaN / Inf leaves
      the parameters and optimizer state unchanged (`nan_policy.NanPolicy`);
      every step reports `nonfinite` (0 or 1) in its metrics either way.
  """

  def __init__(self, model: Any, optimizer: optax.GradientTransformation,
               learning_rate_schedule: Callable[[Any], Any],
               partitioner: partitioning.Partitioner, num_microbatches: int = 1,
               finetuning: Any = None, skip_nonfinite: bool = False):
    if num_microbatches < 1:
      raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    self.num_microbatches = num_microbatches
    self.model = model
    self.base_optimizer = optimizer
    self.optimizer = optimizer  # Made per-layer for scanned stacks in _prepare_init.
    self.finetuning = finetuning
    self.skip_nonfinite = skip_nonfinite
    self.trainable = None  # Per-leaf (per-layer) bool masks; None: everything trains.
    self.schedule = learning_rate_schedule
    self.partitioner = partitioner
    self._train_step = None  # (batch feature names, jitted step)
    self._eval_step = None
    self.state_shardings = None
    self._init_cache = None  # (batch shapes, (init_fn, abstract state))
    self._init_lock = threading.RLock()  # start_compile's threads share these caches
    self._init_compile_lock = threading.Lock()
    self._compiled_init = None  # (init_fn, compiled init)
    self._init_future = None  # (init_fn, Future of (init_fn, compiled init)) of start_compile
    self._compiled_steps: dict[tuple, Any] = {}  # batch shapes -> AOT-compiled train step
    self._background: tuple[tuple, concurrent.futures.Future] | None = None
    self._cancelled = threading.Event()
    self.compile_seconds: dict[str, float] = {}  # 'init' / 'train_step': last compile times
    self.boxed_params = None  # Abstract parameters with their logical axes.

  # -- state ------------------------------------------------------------------
  def _init_fn(self, rng: jax.Array, batch: Batch) -> TrainState:
    init_rng, dropout_rng = jax.random.split(rng)
    params = nn.meta.unbox(self.model.init(init_rng, batch)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params),
                      rng=jax.random.key_data(dropout_rng))

  def _prepare_init(self, batch_shapes: Batch):
    """Once per batch shape: (init_fn(rng) -> TrainState, abstract state), by shape
    evaluation only (nothing compiled).

    Sets the per-layer optimizer, the fine-tuning technique's view of the
    parameters and `state_shardings`: parameter shardings come from the
    logical axis rules, optimizer state shardings follow their parameters;
    the abstract state carries them.
    """
    with self._init_lock:
      shapes = _abstract(batch_shapes)
      cache_key = _shape_key(shapes)
      if self._init_cache is not None and self._init_cache[0] == cache_key:
        return self._init_cache[1]
      boxed = jax.eval_shape(self.model.init, jax.random.key(0), shapes)["params"]
      self.boxed_params = boxed
      stacked = jax.tree.map(
          lambda x: x.value.shape[0] if isinstance(x, nn.LogicallyPartitioned)
          and x.names[:1] == ("layers",) else 0, boxed,
          is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
      self.optimizer = optim.per_layer(self.base_optimizer, stacked)
      if self.finetuning is not None:
        self.optimizer = self.finetuning.wrap_optimizer(self.optimizer, boxed)
        self.trainable = self.finetuning.trainable(boxed)
      # Only the shapes of the batch matter: init traces with zeros (dead code for XLA).
      init_fn = lambda rng: self._init_fn(
          rng, {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()})
      abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
      self.state_shardings = TrainState(
          step=self.partitioner.replicated(),
          params=self.partitioner.variable_shardings(boxed),
          opt_state=self.partitioner.optimizer_state_shardings(abstract_state.opt_state, boxed),
          rng=self.partitioner.replicated())
      abstract_state = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          abstract_state, self.state_shardings)
      self._init_cache = (cache_key, (init_fn, abstract_state))
      self._compiled_init = None
      return init_fn, abstract_state

  def _lower_init(self, batch_shapes: Batch):
    init_fn, _ = self._prepare_init(batch_shapes)
    with self.partitioner.activate():
      return init_fn, jax.jit(init_fn, out_shardings=self.state_shardings).lower(
          jax.random.key(0))

  def _compile_lowered_init(self, init_fn, lowered):
    start = time.perf_counter()
    compiled = lowered.compile(_INIT_COMPILER_OPTIONS.get(jax.default_backend()))
    self.compile_seconds["init"] = time.perf_counter() - start
    return init_fn, compiled

  def _compile_init(self, batch_shapes: Batch):
    """The compiled init(rng) of these batch shapes (once, or `start_compile`'s),
    only when a state is made. On XLA:CPU it is compiled without LLVM
    optimisation (`_INIT_COMPILER_OPTIONS`)."""
    init_fn, _ = self._prepare_init(batch_shapes)
    with self._init_compile_lock:
      pending, self._init_future = self._init_future, None
      if pending is not None and pending[0] is init_fn:
        try:
          self._compiled_init = pending[1].result()
        except Exception as error:  # pylint: disable=broad-except  (redone here: raises here)
          log.debug("background init compilation failed (%s): compiling again", error)
      if self._compiled_init is None or self._compiled_init[0] is not init_fn:
        self._compiled_init = self._compile_lowered_init(*self._lower_init(batch_shapes))
      return self._compiled_init[1]

  def abstract_state(self, batch_shapes: Batch) -> TrainState:
    """ShapeDtypeStructs with shardings of the train state (nothing allocated or compiled)."""
    return self._prepare_init(batch_shapes)[1]

  def init_state(self, seed: int, batch_shapes: Batch) -> TrainState:
    compiled_init = self._compile_init(batch_shapes)
    with self.partitioner.activate():
      return compiled_init(jax.random.key(seed))

  def state_from_params(self, params: Any, step: Any, seed: int) -> TrainState:
    """A train state around given (restored) parameters: a fresh optimizer state
    for them and the dropout key of `seed`; call after `abstract_state`."""
    def make(params, step):
      _, dropout_rng = jax.random.split(jax.random.key(seed))
      return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                        opt_state=self.optimizer.init(params),
                        rng=jax.random.key_data(dropout_rng))
    with self.partitioner.activate():
      return jax.jit(make, out_shardings=self.state_shardings)(params, step)

  # -- steps ------------------------------------------------------------------
  def _summed_grads(self, params: Any, batch: Batch, dropout_rng: jax.Array):
    """Gradients of the summed token loss and the summed statistics of `batch`.

    With `num_microbatches = k > 1` the batch is split into k micro-batches
    (micro-batch i holds rows i, i + k, i + 2k, ..., so every device keeps its
    share) whose gradients are accumulated in a `lax.scan`: activations of
    one micro-batch at a time, same result as the full batch.
    """
    def summed_loss(p, b, rng):
      _, stats = self.model.loss_fn(_stop_untrained(p, self.trainable), b, rng)
      return stats["loss_sum"], stats
    grad_fn = jax.grad(summed_loss, has_aux=True)
    k = self.num_microbatches
    if k == 1:
      return grad_fn(params, batch, dropout_rng)

    def split(x):
      x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(x, self.partitioner.sharding((None, "batch")))

    micro = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                         jax.eval_shape(grad_fn, params, first, dropout_rng))

    def body(total, inputs):
      index, micro_batch = inputs
      out = grad_fn(params, micro_batch, jax.random.fold_in(dropout_rng, index))
      return jax.tree.map(jnp.add, total, out), None

    total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    return total

  def _train_step_fn(self, state: TrainState, batch: Batch):
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    summed_grads, stats = self._summed_grads(state.params, batch, dropout_rng)
    weight_sum = jnp.maximum(stats["weight_sum"], 1.0)
    # Loss per target token of the whole batch, and its gradient.
    loss = stats["loss_sum"] / weight_sum
    grads = jax.tree.map(lambda g: g / weight_sum, summed_grads)
    loss, grads = fault_injection.poison(loss, grads, state.step + 1)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    apply = getattr(self.finetuning, "apply_updates", None)  # sparse FT: exact resets
    params = (optax.apply_updates(state.params, updates) if apply is None
              else apply(state.params, updates, opt_state))
    grad_norm = optax.global_norm(grads)
    nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    if self.skip_nonfinite:  # Decided on the device: no host round trip.
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(nonfinite, o, n), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    step_metrics = {
        **self.model.metrics(stats),
        "loss": loss,
        "grad_norm": grad_norm,
        "nonfinite": nonfinite.astype(jnp.int32),
        "learning_rate": jnp.asarray(self.schedule(state.step), jnp.float32),
        "target_tokens": stats["weight_sum"],
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, step_metrics

  def _eval_step_fn(self, params: Any, batch: Batch):
    _, stats = self.model.loss_fn(params, batch, None)
    return stats

  def _batch_shardings(self, batch: Batch):
    return {k: self.partitioner.batch_sharding() for k in batch}

  def _jitted_train_step(self, batch: Batch):
    names = tuple(sorted(batch))
    if self._train_step is None or self._train_step[0] != names:
      self._train_step = (names, jax.jit(
          self._train_step_fn, in_shardings=(self.state_shardings, self._batch_shardings(batch)),
          out_shardings=(self.state_shardings, self.partitioner.replicated()),
          donate_argnums=(0,)))
    return self._train_step[1]

  def compile_train_step(self, batch_shapes: Batch):
    """Ahead-of-time compiled train step for batches of these (global) shapes.

    Allocates nothing: use `.memory_analysis()` / `.cost_analysis()` of the
    result to see per-device memory and FLOPs before running anything. The
    result is kept: `train_step` runs it for batches of these shapes. When
    `start_compile` is compiling the same shapes, this waits for it.
    """
    key = _shape_key(_abstract(batch_shapes))
    if key in self._compiled_steps:
      return self._compiled_steps[key]
    if self._background is not None and self._background[0] == key:
      try:
        compiled = self._background[1].result()
        if compiled is not None:
          return compiled
      except Exception as error:  # pylint: disable=broad-except  (redone here: raises here)
        log.debug("background compilation failed (%s): compiling again", error)
    return self._compile_train_step_now(batch_shapes)

  def _lower_train_step(self, batch_shapes: Batch):
    abstract_state = self.abstract_state(batch_shapes)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.partitioner.batch_sharding())
              for k, v in batch_shapes.items()}
    with self.partitioner.activate():
      return self._jitted_train_step(shapes).lower(abstract_state, shapes)

  def _compile_lowered_step(self, key: tuple, lowered):
    start = time.perf_counter()
    compiled = lowered.compile()
    self.compile_seconds["train_step"] = time.perf_counter() - start
    self._compiled_steps[key] = compiled
    return compiled

  def _compile_train_step_now(self, batch_shapes: Batch):
    return self._compile_lowered_step(_shape_key(_abstract(batch_shapes)),
                                      self._lower_train_step(batch_shapes))

  def start_compile(self, batch_shapes: Batch, init: bool = True) -> concurrent.futures.Future:
    """Starts compiling the train step (and init) for batches of these (global)
    shapes: traced and lowered here (Python, ~1 s), compiled by XLA in two
    background threads while the caller starts the data pipeline. Returns the
    Future of the compiled step (None when cancelled or failed).

    XLA compiles without the Python lock, so on a multi-core host the
    compilation overlaps the pipeline's imports and first batch (tracing in
    a thread of its own would compete with them for the lock). The first
    `train_step` / `compile_train_step` / `init_state` of these shapes waits
    for it; other shapes compile as usual. Errors are not raised here: the
    caller's own calls compile again and raise them. `init=False` compiles
    the step only (a run that restores a checkpoint). `cancel_compile` stops
    what has not started (an XLA compilation in progress cannot be
    interrupted).
    """
    shapes = _abstract(batch_shapes)
    key = _shape_key(shapes)
    try:
      lowered_step = self._lower_train_step(shapes)
      lowered_init = self._lower_init(shapes) if init else None
    except Exception as error:  # pylint: disable=broad-except  (raised again by the caller's calls)
      log.debug("no background compilation (%s)", error)
      future: concurrent.futures.Future = concurrent.futures.Future()
      future.set_result(None)
      return future

    def step():
      return None if self._cancelled.is_set() else self._compile_lowered_step(key, lowered_step)

    def compile_init():
      if self._cancelled.is_set():
        raise concurrent.futures.CancelledError()
      return self._compile_lowered_init(*lowered_init)

    executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="t5xlike-compile")
    future = executor.submit(step)
    if init:
      self._init_future = (lowered_init[0], executor.submit(compile_init))
    executor.shutdown(wait=False)
    self._background = (key, future)
    return future

  def cancel_compile(self) -> None:
    """Stops background compilation that has not started, now and in later
    `start_compile` calls (e.g. on a configuration error: no wait at exit)."""
    self._cancelled.set()

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update; `state` is donated (do not reuse it).

    Runs the ahead-of-time compiled step of these batch shapes when there is
    one (`compile_train_step`, `start_compile`), else the jitted step.
    """
    shapes = _global_shapes(batch)
    key = _shape_key(shapes)
    compiled = self._compiled_steps.get(key)
    if compiled is None and self._background is not None and self._background[0] == key:
      compiled = self.compile_train_step(shapes)  # waits for start_compile's thread
    with self.partitioner.activate():
      device_batch = self.device_batch(batch)
      if compiled is not None:
        try:
          return compiled(state, device_batch)
        except (TypeError, ValueError) as error:  # argument check, before any donation
          log.info("the compiled train step does not take this state (%s): using the "
                   "jitted step", errors.one_line(error)[:200])
          del self._compiled_steps[key]
      return self._jitted_train_step(batch)(state, device_batch)

  def eval_stats(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
    """Summed loss statistics of one batch (no dropout)."""
    if self._eval_step is None:
      self._eval_step = jax.jit(
          self._eval_step_fn, in_shardings=(self.state_shardings.params,
                                            self._batch_shardings(batch)),
          out_shardings=self.partitioner.replicated())
    with self.partitioner.activate():
      return self._eval_step(params, self.device_batch(batch))

  def device_batch(self, batch: Batch) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays sharded over the batch axis."""
    sharding = self.partitioner.batch_sharding()
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


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
  """Periods of the training loop, in steps (see DESIGN.md §2); validated by the run."""
  train_steps: int
  log_period: int
  eval_period: int | None  # None: no evaluation
  checkpoint_period: int


def train_loop(trainer: Trainer, state: TrainState, train_batches: Any, config: LoopConfig,
               writer: metrics.MetricsWriter, checkpointer: checkpoints.Checkpointer,
               run_eval: Callable[[int, Any], Mapping[str, Mapping[str, float]]] | None = None,
               tokens_per_batch: int = 0, flop_accounting: Any = None,
               guard: preemption.PreemptionGuard | None = None,
               watch: nan_policy.NonFiniteWatch | None = None) -> TrainState:
  """Trains from `state.step` to `config.train_steps`.

  `train_batches` yields this process's rows of successive global batches
  and has `get_state()`, saved with each checkpoint. Step 1 (or the first
  step after a resume) and the final step are always logged, the final step
  always evaluated (when eval is configured) and checkpointed.
  `flop_accounting` (a `t5xlike.flops.Accounting`) adds `tflops_per_device`
  and `mfu` to every logged step. `guard` (a `preemption.PreemptionGuard`):
  after a signal the step reached is logged and checkpointed, then
  `preemption.Stopped` is raised. `watch` applies the NaN policy (default:
  stop at the first non-finite step).
  """
  if watch is None:
    watch = nan_policy.NonFiniteWatch(nan_policy.NanPolicy(), writer.write_train)
  start = int(jax.device_get(state.step))
  total = config.train_steps
  window_start, window_steps = time.perf_counter(), 0
  run_start = window_start
  for step in range(start + 1, total + 1):
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
      if hasattr(train_batches, "metrics"):  # loader throughput, packing efficiency
        values.update(train_batches.metrics())
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
      for task, values in run_eval(step, state.params).items():
        writer.write_eval(step, task, values)
        log.info("eval step %d %s | %s", step, task, " | ".join(
            f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float)))
      window_start, window_steps = time.perf_counter(), 0
    if step % config.checkpoint_period == 0 or is_final or stopping:
      watch.check()  # Never a checkpoint of a state that went bad.
      checkpointer.save(step, state, train_batches.get_state())
    if stopping:
      checkpointer.wait()
      log.info("stopped after step %d: %s", step, checkpoints.step_dir(checkpointer.directory,
                                                                       step))
      raise guard.stopped(step)
  checkpointer.wait()
  return state

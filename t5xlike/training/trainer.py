"""The trainer: jit-compiled train and eval steps of one model over one mesh.

The trainer knows a *model* (network + loss, e.g. `EncoderDecoderModel`), an
optax optimizer with its schedule, a `Partitioner` and optionally a
fine-tuning technique; objectives live in the data pipeline and never branch
the trainer. The layout of the train state is a value (`state_plan.StatePlan`,
computed per batch shapes and kept); ahead-of-time and background
compilation is `step_compiler.StepCompiler`'s; the loop is `loop.train_loop`.
Steps count completed optimizer updates from 1; `TrainState.step` is the
number of completed updates.
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5xlike import errors, interfaces, library_compat, partitioning
from t5xlike.training.fault_hooks import FaultHooks
from t5xlike.training.state_plan import StatePlan, plan_state, shape_key
from t5xlike.training.step_compiler import StepCompiler
from t5xlike.training.train_state import TrainState

log = logging.getLogger(__name__)
Batch = Mapping[str, np.ndarray]  # feature name -> [rows, ...] (this process's rows)
#: A batch or only its shapes: arrays, or `jax.ShapeDtypeStruct`s.
BatchShapes = Mapping[str, np.ndarray | jax.Array | jax.ShapeDtypeStruct]


def global_shapes(batch: Batch) -> dict[str, jax.ShapeDtypeStruct]:
  """This process's rows of a batch -> the global batch's shapes."""
  return {k: jax.ShapeDtypeStruct((np.shape(v)[0] * jax.process_count(),) + np.shape(v)[1:],
                                  v.dtype) for k, v in batch.items()}


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
    model: the model (`interfaces.Model`: `init`, `loss_fn` with summed
      statistics, `metrics`).
    optimizer: optax transformation (already holding the schedule).
    learning_rate_schedule: the same schedule, evaluated for logging.
    partitioner: the mesh and logical axis rules.
    num_microbatches: gradient accumulation: the batch is processed in this
      many micro-batches per optimizer step.
    finetuning: None, or a fine-tuning technique (`interfaces.FineTuningTechnique`):
      it wraps the (per-layer) optimizer, its `trainable` mask decides which
      parameters (layers of scanned leaves) get gradients and its
      `apply_updates` applies each step's updates.
    skip_nonfinite: a step whose loss or gradient norm is NaN / Inf leaves
      the parameters and optimizer state unchanged (`nan_policy.NanPolicy`);
      every step reports `nonfinite` (0 or 1) in its metrics either way.
    fault_hooks: faults injected on purpose (tests and the fault drill only).
  """

  def __init__(self, model: interfaces.Model, optimizer: optax.GradientTransformation,
               learning_rate_schedule: Callable[[Any], Any],
               partitioner: partitioning.Partitioner, num_microbatches: int = 1,
               finetuning: interfaces.FineTuningTechnique | None = None,
               skip_nonfinite: bool = False, fault_hooks: FaultHooks | None = None):
    if num_microbatches < 1:
      raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    self.model = model
    self.optimizer = optimizer  # made per-layer and wrapped per state plan
    self.schedule = learning_rate_schedule
    self.partitioner = partitioner
    self.num_microbatches = num_microbatches
    self.finetuning = finetuning
    self.skip_nonfinite = skip_nonfinite
    self.fault_hooks = fault_hooks
    self._plans: dict[tuple, StatePlan] = {}  # batch shape key -> plan
    self._plans_lock = threading.Lock()  # the compile threads plan too
    self._jitted: dict[tuple, Any] = {}  # batch shape key -> jitted train step
    self._eval_step: Any = None
    self.compiler = StepCompiler(self._lower_train_step, self._lower_init)

  # -- state ------------------------------------------------------------------
  def state_plan(self, batch_shapes: BatchShapes) -> StatePlan:
    """The train state's layout for batches of these shapes (shape evaluation only; kept)."""
    key = shape_key(batch_shapes)
    with self._plans_lock:
      if key not in self._plans:
        self._plans[key] = plan_state(self.model, self.optimizer, self.finetuning,
                                      self.partitioner, batch_shapes)
      return self._plans[key]

  def abstract_state(self, batch_shapes: BatchShapes) -> TrainState:
    """ShapeDtypeStructs with shardings of the train state (nothing allocated or compiled)."""
    return self.state_plan(batch_shapes).abstract_state

  def init_state(self, seed: int, batch_shapes: BatchShapes) -> TrainState:
    """A fresh train state from `seed`, initialised by the compiled init of these shapes."""
    self.state_plan(batch_shapes)
    compiled_init = self.compiler.init(shape_key(batch_shapes))
    with self.partitioner.activate():
      return compiled_init(jax.random.key(seed))

  def state_from_params(self, params: Any, step: Any, seed: int,
                        batch_shapes: BatchShapes) -> TrainState:
    """A train state around given (restored) parameters: a fresh optimizer state for
    them and the dropout key of `seed`, laid out as the plan of these batch shapes."""
    plan = self.state_plan(batch_shapes)

    def make(params: Any, step: Any) -> TrainState:
      _, dropout_rng = jax.random.split(jax.random.key(seed))
      return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                        opt_state=plan.optimizer.init(params),
                        rng=jax.random.key_data(dropout_rng))
    with self.partitioner.activate():
      return jax.jit(make, out_shardings=plan.shardings)(params, step)

  def _lower_init(self, key: tuple) -> Any:
    plan = self._plan_of(key)
    with self.partitioner.activate():
      return jax.jit(plan.init_fn, out_shardings=plan.shardings).lower(jax.random.key(0))

  def _plan_of(self, key: tuple) -> StatePlan:
    with self._plans_lock:
      return self._plans[key]

  # -- steps ------------------------------------------------------------------
  def _summed_grads(self, params: Any, batch: Batch, dropout_rng: jax.Array,
                    trainable: Any) -> tuple[Any, dict[str, jax.Array]]:
    """Gradients of the summed token loss and the summed statistics of `batch`.

    With `num_microbatches = k > 1` the batch is split into k micro-batches
    (micro-batch i holds rows i, i + k, i + 2k, ..., so every device keeps its
    share) whose gradients are accumulated in a `lax.scan`: activations of
    one micro-batch at a time, same result as the full batch.
    """
    def summed_loss(p, b, rng):
      _, stats = self.model.loss_fn(_stop_untrained(p, trainable), b, rng)
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

  def _train_step_fn(self, plan: StatePlan, state: TrainState,
                     batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    summed_grads, stats = self._summed_grads(state.params, batch, dropout_rng, plan.trainable)
    weight_sum = jnp.maximum(stats["weight_sum"], 1.0)
    # Loss per target token of the whole batch, and its gradient.
    loss = stats["loss_sum"] / weight_sum
    grads = jax.tree.map(lambda g: g / weight_sum, summed_grads)
    if self.fault_hooks is not None:
      loss, grads = self.fault_hooks.poison(loss, grads, state.step + 1)
    updates, opt_state = plan.optimizer.update(grads, state.opt_state, state.params)
    if self.finetuning is None:
      params = optax.apply_updates(state.params, updates)
    else:  # sparse fine-tuning writes the initial values back exactly here
      params = self.finetuning.apply_updates(state.params, updates, opt_state)
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

  def _eval_step_fn(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
    _, stats = self.model.loss_fn(params, batch, None)
    return stats

  def _batch_shardings(self, batch: BatchShapes) -> dict[str, jax.sharding.Sharding]:
    return {k: self.partitioner.batch_sharding() for k in batch}

  def _jitted_train_step(self, key: tuple, batch: BatchShapes) -> Any:
    if key not in self._jitted:
      plan = self._plan_of(key)
      self._jitted[key] = jax.jit(
          functools.partial(self._train_step_fn, plan),
          in_shardings=(plan.shardings, self._batch_shardings(batch)),
          out_shardings=(plan.shardings, self.partitioner.replicated()), donate_argnums=(0,))
    return self._jitted[key]

  def jitted_step_compilations(self) -> int:
    """How many times the jitted (not ahead-of-time) train step compiled (diagnostics)."""
    return sum(library_compat.jit_cache_size(step) for step in self._jitted.values())

  def _lower_train_step(self, key: tuple) -> Any:
    plan = self._plan_of(key)
    shapes = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=self.partitioner.batch_sharding())
              for name, shape, dtype in key}
    with self.partitioner.activate():
      return self._jitted_train_step(key, shapes).lower(plan.abstract_state, shapes)

  def lower_train_step(self, batch_shapes: BatchShapes) -> Any:
    """The train step for batches of these (global) shapes, traced and lowered (a
    `jax.stages.Lowered`: `.as_text()` is its StableHLO, `.compile()` compiles it)."""
    self.state_plan(batch_shapes)
    return self._lower_train_step(shape_key(batch_shapes))

  def compile_train_step(self, batch_shapes: BatchShapes) -> Any:
    """Ahead-of-time compiled train step for batches of these (global) shapes.

    Allocates nothing: use `.memory_analysis()` / `.cost_analysis()` of the
    result to see per-device memory and FLOPs before running anything. The
    result is kept: `train_step` runs it for batches of these shapes. When
    `start_compile` is compiling the same shapes, this waits for it.
    """
    self.state_plan(batch_shapes)
    return self.compiler.step(shape_key(batch_shapes))

  def start_compile(self, batch_shapes: BatchShapes,
                    init: bool = True) -> concurrent.futures.Future:
    """Starts compiling the train step (and, with `init`, the initialisation) for batches
    of these (global) shapes in background threads (`StepCompiler.start`); returns the
    Future of the compiled step (None when cancelled or failed)."""
    try:
      self.state_plan(batch_shapes)
    except Exception as error:  # noqa: BLE001  (raised again by the caller's own calls)
      log.debug("no background compilation (%s)", error)
      future: concurrent.futures.Future = concurrent.futures.Future()
      future.set_result(None)
      return future
    return self.compiler.start(shape_key(batch_shapes), init=init)

  def cancel_compile(self) -> None:
    """Stops background compilation that has not started (e.g. on a configuration error)."""
    self.compiler.cancel()

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update; `state` is donated (do not reuse it).

    Runs the ahead-of-time compiled step of these batch shapes when there is
    one (`compile_train_step`, `start_compile`), else the jitted step.
    """
    shapes = global_shapes(batch)
    key = shape_key(shapes)
    self.state_plan(shapes)
    compiled = self.compiler.available_step(key)
    with self.partitioner.activate():
      device_batch = self.device_batch(batch)
      if compiled is not None:
        try:
          return compiled(state, device_batch)
        except (TypeError, ValueError) as error:  # argument check, before any donation
          log.info("the compiled train step does not take this state (%s): using the "
                   "jitted step", errors.one_line(error)[:200])
          self.compiler.forget_step(key)
      return self._jitted_train_step(key, shapes)(state, device_batch)

  def eval_stats(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
    """Summed loss statistics of one batch (no dropout)."""
    if self._eval_step is None:
      plan = self.state_plan(global_shapes(batch))
      self._eval_step = jax.jit(
          self._eval_step_fn, in_shardings=(plan.shardings.params, self._batch_shardings(batch)),
          out_shardings=self.partitioner.replicated())
    with self.partitioner.activate():
      return self._eval_step(params, self.device_batch(batch))

  def device_batch(self, batch: Batch) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays sharded over the batch axis."""
    sharding = self.partitioner.batch_sharding()
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}

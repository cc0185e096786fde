"""Planning the train state of a model on a mesh: a value, computed by shape evaluation only.

`plan_state` evaluates the model's `init` abstractly for batches of given
shapes (nothing allocated or compiled) and returns a `StatePlan`: the
parameters with their logical axes, the optimizer made per-layer for scanned
stacks and wrapped by the fine-tuning technique, which parameters train, the
shardings of every part of the train state (parameters from the logical axis
rules, optimizer state following its parameters) and the abstract state that
carries them. The trainer, the runs and the checkpoint restore read it; none
of them depends on the order in which anything was called.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5xlike import interfaces, optim, partitioning
from t5xlike.training.train_state import TrainState

Batch = Mapping[str, Any]  # feature name -> [batch, ...] array or ShapeDtypeStruct


@dataclasses.dataclass(frozen=True)
class StatePlan:
  """The layout of a train state for batches of one set of shapes.

  Attributes:
    boxed_params: abstract parameters (`nn.LogicallyPartitioned` leaves: shapes and
      logical axis names).
    optimizer: the optimizer the state holds the state of (per-layer for scanned
      stacks, wrapped by the fine-tuning technique).
    trainable: per-leaf bool masks (shape () or per layer [L]) of the parameters
      that get gradients; None: all of them.
    shardings: a `TrainState` of shardings.
    abstract_state: a `TrainState` of ShapeDtypeStructs carrying those shardings.
    init_fn: rng key -> the initial `TrainState` (trace it under the mesh; jit it
      with `out_shardings=shardings`).
  """
  boxed_params: Any
  optimizer: optax.GradientTransformation
  trainable: Any | None
  shardings: TrainState
  abstract_state: TrainState
  init_fn: Callable[[jax.Array], TrainState]


def abstract_batch(batch: Batch) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of a batch of arrays (or of ShapeDtypeStructs)."""
  return {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in batch.items()}


def shape_key(shapes: Mapping[str, Any]) -> tuple:
  """A hashable key of a batch's feature names, shapes and dtypes."""
  return tuple(sorted((k, tuple(np.shape(v)), str(v.dtype)) for k, v in shapes.items()))


def plan_state(model: interfaces.Model, optimizer: optax.GradientTransformation,
               finetuning: interfaces.FineTuningTechnique | None,
               partitioner: partitioning.Partitioner, batch_shapes: Batch) -> StatePlan:
  """The `StatePlan` of `model` trained by `optimizer` (and `finetuning`) on `partitioner`'s
  mesh, for batches of `batch_shapes`' shapes (only the shapes are read)."""
  shapes = abstract_batch(batch_shapes)
  boxed = jax.eval_shape(model.init, jax.random.key(0), shapes)["params"]
  stacked = jax.tree.map(
      lambda x: x.value.shape[0] if isinstance(x, nn.LogicallyPartitioned)
      and x.names[:1] == ("layers",) else 0, boxed,
      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  optimizer = optim.per_layer(optimizer, stacked)
  trainable = None
  if finetuning is not None:
    optimizer = finetuning.wrap_optimizer(optimizer, boxed)
    trainable = finetuning.trainable(boxed)

  def init_fn(rng: jax.Array) -> TrainState:
    # Only the shapes of the batch matter: init traces with zeros (dead code for XLA).
    batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
    init_rng, dropout_rng = jax.random.split(rng)
    params = nn.meta.unbox(model.init(init_rng, batch)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.key_data(dropout_rng))

  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  shardings = TrainState(
      step=partitioner.replicated(), params=partitioner.variable_shardings(boxed),
      opt_state=partitioner.optimizer_state_shardings(abstract.opt_state, boxed),
      rng=partitioner.replicated())
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return StatePlan(boxed_params=boxed, optimizer=optimizer, trainable=trainable,
                   shardings=shardings, abstract_state=abstract, init_fn=init_fn)

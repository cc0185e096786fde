"""Loading a model's parameters from CHECKPOINT_PATH for inference and evaluation.

A plain checkpoint step directory gives its parameters laid out on the mesh of
MESH_SHAPE; a PEFT checkpoint (`finetuning.peft_checkpoint`) gives the model
wrapped with its technique and the full parameter tree (its base checkpoint's
parameters with the PEFT parameters laid over them). Every problem is a
one-line `errors.ConfigError` naming CHECKPOINT_PATH.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5xlike import checkpoints, errors, partitioning
from t5xlike.finetuning import peft_checkpoint
from t5xlike.inference.predictor import example_features


def abstract_params(model: Any, batch_shapes: Mapping[str, Any],
                    partitioner: partitioning.Partitioner) -> tuple[Any, Any]:
  """(ShapeDtypeStructs of the parameters with their shardings, the boxed tree)."""
  shapes = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
            for k, v in batch_shapes.items()}
  boxed = jax.eval_shape(model.init, jax.random.key(0), shapes)["params"]
  shardings = partitioner.variable_shardings(boxed)
  unboxed = nn.meta.unbox(boxed)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      unboxed, shardings), boxed


def restore_params(model: Any, checkpoint_path: str, batch_shapes: Mapping[str, Any],
                   partitioner: partitioning.Partitioner) -> tuple[Any, int]:
  """(parameters, step) of a checkpoint step directory, laid out on the mesh."""
  abstract, _ = abstract_params(model, batch_shapes, partitioner)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=partitioner.replicated())
  params, step = checkpoints.restore_params_from_path(checkpoint_path, abstract, step)
  return params, int(step)


def require_checkpoint_path(checkpoint_path: str | None, macro: str = "CHECKPOINT_PATH") -> str:
  """CHECKPOINT_PATH (or the macro named), or a ConfigError when it is not set or not a step
  directory (checked before anything else is read)."""
  if not checkpoint_path:
    raise errors.ConfigError(f"{macro} is not set (pass --gin.{macro}="
                             f"MODEL_DIR/checkpoint_<N>)")
  try:
    checkpoints.validate_step_dir(checkpoint_path)
  except ValueError as error:
    raise errors.ConfigError(f"{macro}: {errors.one_line(error)}") from None
  return checkpoint_path


def load_checkpoint(model: Any, checkpoint_path: str | None, feature_lengths: Mapping[str, int],
                    partitioner: partitioning.Partitioner) -> tuple[Any, int]:
  """(parameters, step) of CHECKPOINT_PATH for `model`, laid out on `partitioner`'s mesh.

  A PEFT checkpoint (`finetuning.peft_checkpoint`) whose technique merges
  into the base weights (LoRA) gives the merged parameters of `model`'s own
  architecture; others need `load_model_checkpoint` (their model differs).
  Raises errors.ConfigError (one line) when the path is unset, not a step
  directory, or holds parameters of another architecture.
  """
  loaded, params, step = load_model_checkpoint(model, checkpoint_path, feature_lengths,
                                               partitioner)
  method = peft_checkpoint.method_of(checkpoint_path) if loaded is not model else None
  if method is not None:
    if not isinstance(method, peft_checkpoint.Merging):
      raise errors.ConfigError(f"CHECKPOINT_PATH={checkpoint_path} is a {type(method).__name__} "
                               f"PEFT checkpoint: load it with "
                               f"checkpoint_loading.load_model_checkpoint")
    params = method.merge(params)
  return params, step


def load_model_checkpoint(model: Any, checkpoint_path: str | None,
                          feature_lengths: Mapping[str, int],
                          partitioner: partitioning.Partitioner) -> tuple[Any, Any, int]:
  """(model, parameters, step) of CHECKPOINT_PATH, as `load_checkpoint`; for a PEFT
  checkpoint the model is `model` wrapped with the checkpoint's technique
  (`peft.wrap_model`) and the parameters its full tree (the base checkpoint's,
  the PEFT parameters laid over them)."""
  checkpoint_path = require_checkpoint_path(checkpoint_path)
  try:
    checkpoints.validate_step_dir(checkpoint_path)
  except ValueError as error:
    raise errors.ConfigError(f"CHECKPOINT_PATH: {errors.one_line(error)}") from None
  try:
    method = peft_checkpoint.method_of(checkpoint_path)
    if method is None:
      features = example_features(model, feature_lengths)
      extra = set(checkpoints.saved_param_shapes(checkpoint_path)) - set(
          checkpoints.flat_shapes(abstract_params(model, features, partitioner)[0]))
      if peft_checkpoint.peft_parameters(extra):
        raise ValueError(f"it holds PEFT parameters ({peft_checkpoint.peft_parameters(extra)[0]}"
                         f", ...): a PEFT run's own checkpoint; load its "
                         f"MODEL_DIR/peft/checkpoint_<N> (or LoRA's merged/checkpoint_<N>)")
      return (model, *restore_params(model, checkpoint_path, features, partitioner))
    model = method.wrap(model)
    abstract, _ = abstract_params(model, example_features(model, feature_lengths), partitioner)
    params, missing = checkpoints.restore_matching_params(checkpoint_path, abstract)
    if missing:
      raise ValueError(f"neither the PEFT checkpoint nor its base holds {', '.join(missing[:4])}")
    return model, params, int(checkpoints.restore_step(checkpoint_path))
  except ValueError as error:
    raise errors.ConfigError(f"CHECKPOINT_PATH={checkpoint_path} does not fit the model: "
                             f"{errors.one_line(error)}") from None

"""`python -m t5xlike.compile --step=decode`: the decoding `python -m t5xlike.infer` would run,
compiled for a TPU slice or GPU node that is not here (`aot.decode_report`).

Reads what the loaded gin files give `infer_run.infer` (model, TASK_FEATURE_LENGTHS,
BATCH_SIZE, decoding method, `max_decode_length`, MESH_SHAPE and rules) and
compiles, for a batch of BATCH_SIZE prompts padded to the 'inputs' length, the
jitted `predict_batch` that `inference.Predictor` runs (parameters laid out on the
mesh as `inference.checkpoint_loading` restores them, the prompts replicated),
then its prefill and one decode step alone for their estimates. The prefill is
the unpacked one: with PREPACK_PREFILL infer compiles up to four packed variants
per run, whose prefills take fewer rows (`inference.prepacking`); this is the
largest of them. No checkpoint is read and nothing is written.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any

import jax
import numpy as np

from t5xlike import errors
from t5xlike.aot import decode_report, hlo_stats, step_report
from t5xlike.data import batch_shapes as batch_shapes_lib
from t5xlike.inference import checkpoint_loading, decoding, predictor
from t5xlike.runs import compile_run, infer_run, run_config

log = logging.getLogger(__name__)

#: The arguments of `infer_run.infer` that decide the decoding.
DECODE_ARGUMENTS = ("model", "data", "decoding_config", "max_decode_length", "partitioning")


def _compiled(lowered: Any) -> tuple[Any, float]:
  start = time.perf_counter()
  try:
    return lowered.compile(), time.perf_counter() - start
  except jax.errors.JaxRuntimeError as error:
    raise errors.RunError(f"the compiler refused the decoding: "
                          f"{errors.one_line(error)[:300]}") from None


def compile_decode(topology: str, num_slices: int = 1) -> decode_report.DecodeReport:
  """Compiles the configured decoding for `topology` (module docstring); `errors.ConfigError`
  for bad input (one line), `errors.RunError` when the compiler refuses it."""
  target = compile_run.parse_target(topology, num_slices)
  arguments = compile_run.gin_arguments(infer_run.infer, DECODE_ARGUMENTS)
  model, data = arguments["model"], arguments["data"]
  config: run_config.PartitioningConfig = arguments["partitioning"]
  method: decoding.DecodingConfig = arguments["decoding_config"] or decoding.DecodingConfig()
  lengths = dict(data.task_feature_lengths)
  max_length = int(arguments["max_decode_length"] or lengths.get("targets", 0))
  if max_length < 1:
    raise errors.ConfigError("--step=decode needs TASK_FEATURE_LENGTHS['targets'] or "
                             "max_decode_length >= 1 (the tokens generated per row)")
  errors.require_int("BATCH_SIZE", data.batch_size)
  _, partitioner, _ = compile_run.target_mesh(target, config)
  mesh = partitioner.mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  try:
    shapes = batch_shapes_lib.expected_batch_shapes(model.feature_converter, lengths,
                                                    data.batch_size, pack=False)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      params, _ = checkpoint_loading.abstract_params(
          model, predictor.example_features(model, lengths), partitioner)
  except (ValueError, TypeError, KeyError) as error:
    raise errors.ConfigError(f"model: {errors.one_line(error)}") from None
  batch = {name: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated)
           for name, s in shapes.items()}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  eos_id = model.vocabulary.eos_id if model.vocabulary is not None else 1
  log.info("compiling the decoding (%s, %d tokens) for %s: %s", method.method, max_length,
           target.describe(), partitioner.describe())
  generate = jax.jit(functools.partial(model.predict_batch, config=method,
                                       max_length=max_length, eos_id=eos_id))
  prefill = jax.jit(functools.partial(model.decoding_start, max_length=max_length))
  with partitioner.activate():
    whole, whole_seconds = _compiled(generate.lower(params, batch, rng=rng))
    log.info("compiling the prefill and one decode step alone, for their estimates")
    start, start_seconds = _compiled(prefill.lower(params, batch))
    state, _ = jax.eval_shape(prefill, params, batch)
    state = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(
        leaf.shape, leaf.dtype, sharding=sharding), state, start.output_shardings[0])
    tokens = jax.ShapeDtypeStruct((data.batch_size, 1), np.int32, sharding=replicated)
    step, step_seconds = _compiled(jax.jit(model.decoding_step).lower(params, tokens, state))
  rules = config.logical_axis_rules
  return decode_report.DecodeReport(
      target=target, device_kind=mesh.devices.flat[0].device_kind,
      model_name=compile_run.model_name(model), mesh=dict(mesh.shape),
      rules=rules if isinstance(rules, str) else "custom",
      batch_shapes={k: tuple(v.shape) for k, v in shapes.items()}, max_length=max_length,
      method=method.method,
      params_bytes=step_report.sharded_bytes(params),
      cache_bytes=int(start.memory_analysis().output_size_in_bytes),
      memory=step_report.memory_of(whole.memory_analysis(), target),
      prefill=decode_report.ProgramEstimate.of(start, target, start_seconds),
      step=decode_report.ProgramEstimate.of(step, target, step_seconds),
      stats=hlo_stats.hlo_stats(whole.as_text()), compile_seconds=whole_seconds)

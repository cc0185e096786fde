"""Named benchmark configs and the timed train-step loop of `scripts/benchmark.py`.

A config is a network family, its dimensions and default shapes. The loop
builds the project's own `Trainer` (Adafactor, rsqrt schedule, as
runs/pretrain.gin), compiles the train step ahead of time, feeds it from the
real data pipeline (span corruption / causal LM on the embedded corpus,
packing on) or from synthetic NumPy batches, runs `warmup` + `steps` steps
with one step in flight (the next batch is read while the current step
runs) and reports one dict: shapes, compile time, time to first step, step
time median / p90, tokens/s, TFLOP/s per device, MFU, peak memory.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import resource
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jaxlib
import numpy as np
import optax

from t5xlike import flops, optim, partitioning
from t5xlike.data import batch_shapes
from t5xlike.models import decoder, encoder_decoder, t5
from t5xlike.objectives import lm, span_corruption
from t5xlike.training import trainer as trainer_lib


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """family 't5' or 'decoder'; dims as the network config's fields; default shapes."""
  family: str
  dims: Mapping[str, int]
  batch_size: int = 8
  inputs_length: int = 512
  targets_length: int = 114
  vocab_size: int = 32128


_T5 = lambda emb, heads, head_dim, mlp, depth: dict(
    emb_dim=emb, num_heads=heads, head_dim=head_dim, mlp_dim=mlp, num_encoder_layers=depth,
    num_decoder_layers=depth)
_DEC = lambda emb, heads, kv, head_dim, mlp, depth: dict(
    emb_dim=emb, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, mlp_dim=mlp,
    num_layers=depth)

CONFIGS: dict[str, BenchConfig] = {
    # t5x's t5_1_1/tiny.gin: the reference figures' tiny model.
    "t5x_tiny": BenchConfig("t5", _T5(8, 4, 3, 16, 2)),
    "t5_1_1_tiny": BenchConfig("t5", _T5(64, 4, 16, 256, 2)),  # ours (quickstart)
    "t5_1_1_small": BenchConfig("t5", _T5(512, 6, 64, 1024, 8)),
    "t5_1_1_base": BenchConfig("t5", _T5(768, 12, 64, 2048, 12)),
    "t5_1_1_large": BenchConfig("t5", _T5(1024, 16, 64, 2816, 24)),
    # Llama-style: 125M (GPT-3 Small shape, GQA 4) and 1.1B (TinyLlama's shape).
    "decoder_125m": BenchConfig("decoder", _DEC(768, 12, 4, 64, 2048, 12), targets_length=1024,
                                inputs_length=0),
    "decoder_1b": BenchConfig("decoder", _DEC(2048, 32, 4, 64, 5632, 22), targets_length=2048,
                              inputs_length=0),
}


def network_config(bench: BenchConfig, dtype: str, attention: str, remat: str, scan: bool,
                   num_layers: int | None = None) -> t5.T5Config | decoder.DecoderConfig:
  """The network config of a benchmark: `bench`'s dimensions with `dtype` activations,
  the `attention` kernel, the `remat` policy and `scan` over layers; `num_layers`
  overrides the depth (of each T5 stack)."""
  common: dict[str, Any] = dict(vocab_size=bench.vocab_size, dtype=dtype,
                                attention_impl=attention, remat_policy=remat, scan_layers=scan)
  dims: dict[str, Any] = dict(bench.dims)
  if num_layers:
    depth = ("num_encoder_layers", "num_decoder_layers") if bench.family == "t5" else (
        "num_layers",)
    dims.update({key: num_layers for key in depth})
  if bench.family == "t5":
    return t5.T5Config(**dims, **common)
  return decoder.DecoderConfig(**dims, **common)


def make_model(bench: BenchConfig, cfg: Any, loss_impl: str = "dense") -> Any:
  if bench.family == "t5":
    return encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg), loss_impl=loss_impl)
  return decoder.DecoderOnlyModel(decoder.Transformer(cfg), loss_impl=loss_impl)


def feature_lengths(bench: BenchConfig, inputs_length: int, targets_length: int) -> dict:
  if bench.family == "t5":
    return {"inputs": inputs_length, "targets": targets_length}
  return {"targets": targets_length}


def synthetic_batches(bench: BenchConfig, batch: int, lengths: Mapping[str, int], seed: int = 0):
  """Endless random full-length batches (ids below 8,192, no padding, no packing)."""
  rng = np.random.default_rng(seed)
  ids = lambda length: rng.integers(1, 8192, (batch, length)).astype(np.int32)
  while True:
    out = {"decoder_input_tokens": ids(lengths["targets"]),
           "decoder_target_tokens": ids(lengths["targets"]),
           "decoder_loss_weights": np.ones((batch, lengths["targets"]), np.float32)}
    if bench.family == "t5":
      out["encoder_input_tokens"] = ids(lengths["inputs"])
    yield out


def pipeline_batches(bench: BenchConfig, batch: int, lengths: Mapping[str, int], seed: int = 0):
  """The project's grain pipeline on the embedded corpus, packing on: span corruption
  for T5, causal LM for the decoder (imports TensorFlow/seqio/grain)."""
  # TensorFlow, seqio and grain only here: synthetic benchmarks run where they are absent.
  from t5xlike.data import pipeline, task_examples  # noqa: PLC0415
  task_examples.import_module("t5xlike.tasks.embedded")
  objective = span_corruption.SpanCorruption() if bench.family == "t5" else lm.CausalLM()
  converter = "encoder_decoder" if bench.family == "t5" else "decoder"
  return pipeline.make_feed("embedded_corpus", "train", lengths, batch, objective, seed=seed,
                            pack=True, feature_converter=converter, num_threads=0)


def real_tokens(batch: Mapping[str, np.ndarray]) -> int:
  """Non-padding encoder + decoder tokens (decoder tokens alone for decoder-only)."""
  return int(sum((np.asarray(batch[k]) > 0).sum() for k in ("encoder_input_tokens",
                                                            "decoder_target_tokens")
                 if k in batch))


def padded_tokens(batch: Mapping[str, np.ndarray]) -> int:
  return int(sum(np.asarray(batch[k]).size for k in ("encoder_input_tokens",
                                                     "decoder_target_tokens") if k in batch))


def peak_memory() -> tuple[int, str]:
  """(bytes, kind): the device's peak bytes in use, or the process's peak RSS on CPU."""
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device"
  scale = 1 if sys.platform == "darwin" else 1024
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "rss"


def versions() -> dict[str, str]:
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "python": sys.version.split()[0]}


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
  """One benchmark run (`scripts/benchmark.py`'s flags).

  Attributes:
    name: the config (a key of CONFIGS).
    batch_size, inputs_length, targets_length: the global batch and its lengths
      (tokens; `inputs_length` unused by decoder-only configs).
    dtype: 'float32' or 'bfloat16' activations.
    steps, warmup: timed steps, and untimed ones before them (>= 1).
    mesh_shape: MESH_SHAPE.
    attention: the attention kernel (`models.attention.IMPLEMENTATIONS`).
    remat: 'none', 'full' or 'dots_saveable'.
    scan: scan over layers.
    data: 'pipeline' (the real grain pipeline, packed) or 'synthetic'.
    compile_only: compile and report memory and XLA's FLOP count, run nothing.
    peak_tflops: the device's peak TFLOP/s for MFU (None: measured or tabulated).
    loss_impl: 'dense' or 'chunked'.
    num_layers: override the depth (of each T5 stack).
    profile: also report the top XLA ops of one profiled step.
  """
  name: str
  batch_size: int
  inputs_length: int
  targets_length: int
  dtype: str = "float32"
  steps: int = 10
  warmup: int = 2
  mesh_shape: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"data": -1})
  attention: str = "auto"
  remat: str = "none"
  scan: bool = False
  data: str = "pipeline"
  compile_only: bool = False
  peak_tflops: float | None = None
  loss_impl: str = "dense"
  num_layers: int | None = None
  profile: bool = False


def run(settings: BenchmarkSettings, process_start: float) -> dict[str, Any]:
  """Benchmarks one config; returns the JSON row (see the module docstring).
  `process_start` (perf_counter) is when the process started: time to first step."""
  bench, cfg = CONFIGS[settings.name], settings
  model = make_model(bench, network_config(bench, cfg.dtype, cfg.attention, cfg.remat,
                                           cfg.scan, cfg.num_layers), cfg.loss_impl)
  lengths = feature_lengths(bench, cfg.inputs_length, cfg.targets_length)
  schedule = optim.rsqrt_with_warmup()
  partitioner = partitioning.Partitioner(dict(cfg.mesh_shape),
                                         partitioning.logical_axis_rules("data_fsdp_tensor"))
  trainer = trainer_lib.Trainer(model, optim.adafactor(schedule), schedule, partitioner)
  # The step compiles (in a thread) while the pipeline starts: shapes from the lengths.
  shapes = batch_shapes.expected_batch_shapes(model.feature_converter, lengths, cfg.batch_size,
                                              pack=cfg.data != "synthetic")
  compile_start = time.perf_counter()
  trainer.start_compile(shapes)
  batches = (synthetic_batches if cfg.data == "synthetic" else pipeline_batches)(
      bench, cfg.batch_size, lengths)
  first = next(batches)
  if not batch_shapes.matches(shapes, first):
    raise AssertionError(f"predicted batch shapes {shapes} differ from the pipeline's "
                         f"{batch_shapes.shapes_of(first)}")
  step_flops = flops.model_step_flops(model, shapes)
  if step_flops is None:  # Both benchmark families are covered by the FLOP formulas.
    raise AssertionError(f"no FLOP formula for {type(model).__name__}")
  row = _settings_row(cfg, bench, step_flops)
  wait_start = time.perf_counter()
  compiled = trainer.compile_train_step(shapes)
  row["compile_s"] = trainer.compiler.seconds["train_step"]  # in the thread, overlapped
  row["startup_s"] = wait_start - compile_start  # pipeline start + first batch
  row["compile_wait_s"] = time.perf_counter() - wait_start  # compile not hidden by it
  peak, peak_source = flops.peak_tflops_per_device(cfg.dtype, configured=cfg.peak_tflops,
                                                   repeats=40)
  if cfg.compile_only:
    memory = compiled.memory_analysis()
    row.update(compiled_memory_bytes=int(memory.argument_size_in_bytes
                                         + memory.temp_size_in_bytes),
               xla_flops_per_device=float(compiled.cost_analysis().get("flops", 0.0)))
  else:
    row.update(time_steps(trainer, compiled, batches, first, cfg.steps, cfg.warmup,
                          process_start))
    achieved = step_flops.model / row["step_time_s"] / jax.device_count() / 1e12
    row.update(tflops_per_device=achieved, mfu=achieved / peak)
    if cfg.profile:
      row["top_ops"] = profile_top_ops(trainer, compiled, batches)
  row["init_compile_s"] = trainer.compiler.seconds.get("init")  # also in a thread
  row["peak_memory_bytes"], row["peak_memory_kind"] = peak_memory()
  row.update(peak_tflops_per_device=peak, peak_source=peak_source,
             device=jax.devices()[0].device_kind, platform=jax.default_backend(),
             device_count=jax.device_count(), versions=versions())
  batches.close()
  return row


def _settings_row(cfg: BenchmarkSettings, bench: BenchConfig,
                  step_flops: flops.StepFlops) -> dict[str, Any]:
  """The row's description of what was measured."""
  return {
      "config": cfg.name, "family": bench.family, "batch_size": cfg.batch_size,
      "inputs_length": cfg.inputs_length if bench.family == "t5" else 0,
      "targets_length": cfg.targets_length, "vocab_size": bench.vocab_size, "dtype": cfg.dtype,
      "num_layers": cfg.num_layers or bench.dims.get("num_layers", bench.dims.get(
          "num_encoder_layers")),
      "attention": cfg.attention, "loss": cfg.loss_impl, "remat": cfg.remat, "scan": cfg.scan,
      "mesh_shape": dict(cfg.mesh_shape), "data": cfg.data,
      "model_flops_per_step": step_flops.model, "hardware_flops_per_step": step_flops.hardware}


def time_steps(trainer, compiled, batches, first, steps: int, warmup: int,
               process_start: float) -> dict[str, Any]:
  """Runs `warmup` (>= 1) + `steps` steps with one step in flight: step i + 1 is
  dispatched and its batch read before step i's metrics are awaited. A step's
  time is the interval between the completions of consecutive steps.
  `cpu_s_per_step` is the process's CPU time (all threads) per timed step.
  Time to first step counts from `process_start`."""
  state = trainer.init_state(0, first)
  completions, cpu_times, batch, pending = [], [], first, None
  real = padded = 0
  with trainer.partitioner.activate():
    for index in range(warmup + steps):
      state, metrics = compiled(state, trainer.device_batch(batch))
      if index >= warmup:
        real, padded = real + real_tokens(batch), padded + padded_tokens(batch)
      if pending is not None:
        jax.block_until_ready(pending)
        completions.append(time.perf_counter())
        cpu_times.append(time.process_time())
      if index == 0:
        jax.block_until_ready(metrics)
        completions.append(time.perf_counter())
        cpu_times.append(time.process_time())
        first_step, metrics = completions[0], None
      pending = metrics
      if index + 1 < warmup + steps:
        batch = next(batches)
    if pending is not None:
      loss = float(jax.device_get(pending["loss"]))
      completions.append(time.perf_counter())
      cpu_times.append(time.process_time())
  times = np.diff(np.asarray(completions))[warmup - 1:]
  median = float(np.median(times))
  return {"steps": len(times), "warmup": warmup,
          "time_to_first_step_s": first_step - process_start,
          "step_time_s": median, "step_time_p90_s": float(np.percentile(times, 90)),
          "step_time_min_s": float(np.min(times)),
          # Process CPU seconds (all threads) per timed step: robust to a shared machine.
          "cpu_s_per_step": (cpu_times[-1] - cpu_times[warmup - 1]) / len(times),
          "tokens_per_second": real / len(times) / median,
          "padded_tokens_per_second": padded / len(times) / median, "final_loss": loss}


def profile_top_ops(trainer, compiled, batches, steps: int = 2, top: int = 12,
                    directory: str | None = None) -> list[dict[str, Any]]:
  """Traces `steps` more steps with `jax.profiler` and returns the `top` XLA ops by
  time: [{"op": fusion name, "ms_per_step": ..., "source": its op_name metadata}].

  The trace is written to `directory` (a temporary one when None); XLA:CPU
  records one event per executed thunk, named as the compiled HLO's ops.
  """
  directory = directory or tempfile.mkdtemp(prefix="t5xlike_profile_")
  sources = dict(re.findall(r"%([\w.\-]+) = .*?op_name=\"([^\"]+)\"", compiled.as_text()))
  state = trainer.init_state(0, next(batches))
  with trainer.partitioner.activate():
    state, metrics = compiled(state, trainer.device_batch(next(batches)))
    jax.block_until_ready(metrics)
    jax.profiler.start_trace(directory)
    for _ in range(steps):
      state, metrics = compiled(state, trainer.device_batch(next(batches)))
      jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
  files = sorted(glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True))
  events = json.load(gzip.open(files[-1]))["traceEvents"] if files else []
  totals: collections.Counter = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in sources:
      totals[event["name"]] += event.get("dur", 0)
  return [{"op": name, "ms_per_step": micros / steps / 1e3,
           "source": sources[name].replace("jit(_train_step_fn)/", "")[:160]}
          for name, micros in totals.most_common(top)]

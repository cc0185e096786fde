"""Prints compile times of scanned T5.1.1 stacks and per-device memory per preset.

Nothing is allocated: every number comes from ahead-of-time compilation
(`jit(...).lower(...).compile()`, `memory_analysis()`) over abstract arrays.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python scripts/benchmark_partitioning.py [--compile_layers 2,8,24] [--sizes base,large]
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from t5xlike import optim, partitioning
from t5xlike.models import encoder_decoder, t5
from t5xlike.training import trainer as trainer_lib

SIZES = {  # emb, heads, layers per stack, head_dim, mlp (published T5.1.1)
    "small": (512, 6, 8, 64, 1024), "base": (768, 12, 12, 64, 2048),
    "large": (1024, 16, 24, 64, 2816), "xl": (2048, 32, 24, 64, 5120)}
PRESETS = {"data_parallel": {"data": -1}, "fsdp": {"fsdp": -1},
           "data_fsdp_tensor": {"data": 2, "fsdp": -1, "tensor": 2}}


def config(size: str, **overrides) -> t5.T5Config:
  emb, heads, depth, head_dim, mlp = SIZES[size]
  base = dict(vocab_size=32128, emb_dim=emb, num_heads=heads, num_encoder_layers=depth,
              num_decoder_layers=depth, head_dim=head_dim, mlp_dim=mlp, scan_layers=True)
  base.update(overrides)
  return t5.T5Config(**base)


def batch_shapes(batch: int, inputs: int, targets: int) -> dict:
  spec = lambda length, dtype: jax.ShapeDtypeStruct((batch, length), dtype)
  return {"encoder_input_tokens": spec(inputs, np.int32),
          "decoder_input_tokens": spec(targets, np.int32),
          "decoder_target_tokens": spec(targets, np.int32),
          "decoder_loss_weights": spec(targets, np.float32)}


def make_trainer(cfg: t5.T5Config, preset: str, mesh_shape: dict) -> trainer_lib.Trainer:
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg))
  schedule = optim.rsqrt_with_warmup()
  return trainer_lib.Trainer(model, optim.adafactor(schedule), schedule,
                             partitioning.Partitioner(mesh_shape,
                                                      partitioning.logical_axis_rules(preset)))


def compile_times(layers: list[int], batch: dict) -> None:
  print(f"\ncompile time of the train step, T5.1.1-small width, {jax.device_count()} devices, "
        f"data parallel")
  print(f"{'layers/stack':>12} {'scanned s':>10} {'unscanned s':>12}")
  for depth in layers:
    row = []
    for scan in (True, False):
      if not scan and depth > 8:
        row.append(float("nan"))
        continue
      cfg = config("small", num_encoder_layers=depth, num_decoder_layers=depth, scan_layers=scan)
      trainer = make_trainer(cfg, "data_parallel", {"data": -1})
      start = time.perf_counter()
      trainer.compile_train_step(batch)
      row.append(time.perf_counter() - start)
    print(f"{depth:>12} {row[0]:>10.1f} {row[1]:>12.1f}")


def memory(sizes: list[str], batch: dict) -> None:
  print(f"\nper-device memory (GB) of the train step, {jax.device_count()} devices, "
        f"batch {batch['encoder_input_tokens'].shape}, float32 params, Adafactor, remat=full")
  print(f"{'size':>6} {'preset':>18} {'arguments':>10} {'temporaries':>12} {'total':>8}")
  for size in sizes:
    for preset, mesh_shape in PRESETS.items():
      trainer = make_trainer(config(size, remat_policy="full"), preset, mesh_shape)
      stats = trainer.compile_train_step(batch).memory_analysis()
      args, temps = stats.argument_size_in_bytes / 1e9, stats.temp_size_in_bytes / 1e9
      print(f"{size:>6} {preset:>18} {args:>10.2f} {temps:>12.2f} {args + temps:>8.2f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--compile_layers", default="2,8,24")
  parser.add_argument("--sizes", default="base,large")
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args()
  batch = batch_shapes(args.batch, 512, 114)
  print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}")
  compile_times([int(x) for x in args.compile_layers.split(",") if x],
                batch_shapes(8, 512, 114))
  memory([s for s in args.sizes.split(",") if s], batch)


if __name__ == "__main__":
  main()

"""MosaicBERT's unpadding: encoder train-step throughput with and without it.

  python scripts/benchmark_unpadding.py [--emb_dim=256] [--num_layers=4] [--num_heads=4]
      [--mlp_dim=1024] [--length=128] [--batch_size=32] [--steps=10] [--warmup=2]
      [--position_encoding=alibi] [--mlp_activations=gelu,linear] [--mask_rate=0.3]

The real pipeline on realistic padding: the embedded corpus' paragraphs (one
example each, of its own length, at most `--length` tokens), masked as
`objectives/mosaicbert.gin` masks them (30%, whole examples), through the
project's Trainer (Adafactor, the tiny run's schedule), for two layouts of the
same examples:

- padded: one example per row, 0-padded to `--length` (BERT's layout);
- unpadded: the examples packed into shared rows by the pipeline's first-fit
  packer (segment ids keep them apart; ALiBi's |i - j| bias is per segment),
  so the step spends no compute on padding (MosaicBERT §2.1 "Unpadding").

Both run the same model on the same row shape (the unpadded step also reads segment
ids and positions); printed per layout:
step time (median of the timed steps), real (non-padding) tokens/s, padded
tokens/s, the fraction of positions that are padding, examples per row, and
the last loss; then the real-tokens/s ratio unpadded / padded.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from t5xlike.cli import startup_noise

startup_noise.quiet()  # Before JAX: no libtpu warnings on a host without a TPU.

import jax
import numpy as np

from t5xlike import benchmarking, optim, partitioning
from t5xlike.data import batch_shapes, pipeline, task_examples
from t5xlike.models import encoder
from t5xlike.objectives import mlm
from t5xlike.training import trainer as trainer_lib

TASK = "embedded_paragraphs"
VOCAB_SIZE = 8192  # The embedded vocabulary (8,100 ids) padded to a multiple of 128.


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--emb_dim", type=int, default=256)
  p.add_argument("--num_layers", type=int, default=4)
  p.add_argument("--num_heads", type=int, default=4)
  p.add_argument("--mlp_dim", type=int, default=1024)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--position_encoding", default="alibi", choices=encoder.POSITION_ENCODINGS)
  p.add_argument("--mlp_activations", default="gelu,linear")
  p.add_argument("--mask_rate", type=float, default=0.3)
  return p


def measure(args: argparse.Namespace, unpad: bool) -> dict[str, float]:
  """One layout: the timed steps' figures (see the module docstring)."""
  config = encoder.EncoderConfig(
      vocab_size=VOCAB_SIZE, emb_dim=args.emb_dim, num_heads=args.num_heads,
      num_layers=args.num_layers, head_dim=args.emb_dim // args.num_heads,
      mlp_dim=args.mlp_dim, mlp_activations=tuple(args.mlp_activations.split(",")),
      max_length=args.length, position_encoding=args.position_encoding)
  model = encoder.MLMModel(encoder.EncoderNetwork(config))
  schedule = optim.rsqrt_with_warmup(base_learning_rate=1.0, warmup_steps=100)
  partitioner = partitioning.Partitioner({"data": -1},
                                         partitioning.logical_axis_rules("data_fsdp_tensor"))
  trainer = trainer_lib.Trainer(model, optim.adafactor(schedule), schedule, partitioner)
  lengths = {"inputs": args.length}
  objective = mlm.MaskedLanguageModeling(mask_rate=args.mask_rate, whole_examples=True)
  batches = pipeline.make_feed(TASK, "train", lengths, args.batch_size, objective, seed=0,
                               pack=unpad, feature_converter="encoder", num_threads=0)
  shapes = batch_shapes.expected_batch_shapes(model.feature_converter, lengths,
                                              args.batch_size, pack=unpad)
  first = next(batches)
  compiled = trainer.compile_train_step(shapes)
  segments_per_row = (float(np.mean(np.max(first["encoder_segment_ids"], axis=1)))
                      if unpad else 1.0)
  row = benchmarking.time_steps(trainer, compiled, batches, first, args.steps, args.warmup,
                                time.perf_counter())
  batches.close()
  row["padding_fraction"] = 1.0 - row["tokens_per_second"] / row["padded_tokens_per_second"]
  row["examples_per_row"] = segments_per_row
  return row


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  task_examples.import_module("t5xlike.tasks.embedded")
  print(f"# {TASK}, MLM {args.mask_rate:.0%} of whole examples, length {args.length}, "
        f"batch {args.batch_size}; encoder emb {args.emb_dim}, {args.num_layers} layers, "
        f"{args.num_heads} heads, mlp {args.mlp_dim} ({args.mlp_activations}), "
        f"{args.position_encoding}; {jax.devices()[0].device_kind} x {jax.device_count()}")
  rows = {}
  for name, unpad in (("padded", False), ("unpadded", True)):
    row = rows[name] = measure(args, unpad)
    print(f"{name:9s} step {row['step_time_s'] * 1e3:8.1f} ms | real tok/s "
          f"{row['tokens_per_second']:10,.0f} | padded tok/s "
          f"{row['padded_tokens_per_second']:10,.0f} | padding {row['padding_fraction']:6.1%} | "
          f"examples/row {row['examples_per_row']:5.2f} | loss {row['final_loss']:.3f}",
          flush=True)
  ratio = rows["unpadded"]["tokens_per_second"] / rows["padded"]["tokens_per_second"]
  print(f"unpadded / padded real tokens/s: {ratio:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Prepacked prefill against the padded one: prefill and end-to-end time on long-tailed prompts.

  python scripts/benchmark_prepack.py [--model=decoder/tiny] \
      [--gin="decoder.DecoderConfig.emb_dim=256"] [--examples=128] [--batch_size=32] \
      [--input_length=128] [--max_length=16] [--median=16] [--sigma=1.0] [--repeats=3]

Prompt lengths are lognormal (median `--median` tokens, log-space standard deviation
`--sigma`), rounded, clipped to [1, input_length] (a long tail with some prompts at
the cap), random ids; random parameters (speed does not depend on them). Every
row generates exactly `--max_length` tokens greedily (eos_id outside the
vocabulary). For each of unpacked and `prepack_prefill`:

- prefill: the model's `decoding_start` / `prepacked_decoding_start` over every
  batch (host-side packing included), ms per batch;
- end to end: `Predictor.predict` over all examples (batching, packing, prefill,
  decoding, trimming), seconds;

compiled once per shape before the timing (the first pass is untimed), the best of
`--repeats` timed passes. Also printed: the prefill rows and padded tokens each
path runs, and whether the generated ids are identical (they must be).
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import gin
import jax
import numpy as np

from t5xlike.cli import gin_config
from t5xlike.inference import predictor


def build(model_gin: str, bindings: list[str], feature_lengths: dict[str, int]):
  gin_config.configure([f"models/{model_gin}.gin"], bindings=bindings)
  model = gin.query_parameter("%MODEL").scoped_configurable_fn()
  gin.clear_config()
  features = predictor.example_features(model, feature_lengths)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), features)["params"])
  return model, params


def prompt_lengths(count: int, median: float, sigma: float, cap: int, seed: int) -> np.ndarray:
  """int [count]: lognormal lengths (median, sigma in log space), rounded, clipped to [1, cap]."""
  rng = np.random.default_rng(seed)
  return np.clip(np.rint(rng.lognormal(np.log(median), sigma, count)), 1, cap).astype(int)


def best_of(repeats: int, run) -> float:
  """The fastest of `repeats` timed calls of `run` (seconds), after one untimed call."""
  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="decoder/tiny", help="a gin_configs/models/ name")
  parser.add_argument("--gin", action="append", default=[], help="a gin binding (repeatable)")
  parser.add_argument("--examples", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--input_length", type=int, default=128)
  parser.add_argument("--max_length", type=int, default=16)
  parser.add_argument("--median", type=float, default=16.0)
  parser.add_argument("--sigma", type=float, default=1.0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  gin_config.quiet_gin_search_logs()
  feature_lengths = {"inputs": args.input_length, "targets": args.max_length}
  model, params = build(args.model, args.gin, feature_lengths)
  lengths = prompt_lengths(args.examples, args.median, args.sigma, args.input_length, args.seed)
  rng = np.random.default_rng(args.seed + 1)
  examples = [{"inputs": rng.integers(2, model.vocab_size, n).astype(np.int32)} for n in lengths]
  print(f"{args.model} {' '.join(args.gin)}: {sum(x.size for x in jax.tree.leaves(params)):,} "
        f"parameters, {jax.devices()[0].device_kind}; {args.examples} prompts, lengths "
        f"median {np.median(lengths):.0f} mean {lengths.mean():.1f} p90 "
        f"{np.percentile(lengths, 90):.0f} max {lengths.max()} (cap {args.input_length}), "
        f"batch {args.batch_size}, {args.max_length} generated tokens per prompt")

  results = {}
  for packed in (False, True):
    run = predictor.Predictor(model, params, feature_lengths, args.batch_size,
                              max_decode_length=args.max_length, eos_id=model.vocab_size + 1,
                              prepack_prefill=packed)
    batches = list(run._batches(examples, drop_targets=True))
    start_fn = jax.jit(model.prepacked_decoding_start if packed else model.decoding_start,
                       static_argnums=3 if packed else 2)

    def prefill(run=run, batches=batches, start_fn=start_fn, packed=packed):
      for batch, real in batches:
        if packed:
          out = start_fn(params, batch, run.pack(batch, real), args.max_length)
        else:
          out = start_fn(params, batch, args.max_length)
        jax.block_until_ready(out[1])

    prefill_s = best_of(args.repeats, prefill)
    end_to_end = []
    predictions = None
    for _ in range(args.repeats + 1):  # Predictor times without its compilation.
      predictions = run.predict(examples)
      end_to_end.append(run.last_stats["seconds"])
    rows = run.last_stats["prefill_rows"]
    width = model.prompt_layout(batches[0][0])[1]
    tokens = sum(int(model.prompt_layout(batch)[0][:real].sum()) for batch, real in batches)
    longest = sum(args.batch_size * int(model.prompt_layout(batch)[0][:real].max())
                  for batch, real in batches)
    results[packed] = (prefill_s, min(end_to_end[1:]), predictions)
    print(f"  {'prepacked' if packed else 'unpacked ':9s}  prefill rows {rows:4d} "
          f"of {width} ({rows * width:,} slots for {tokens:,} prompt tokens; padded to "
          f"each batch's longest: {longest:,})  "
          f"prefill {prefill_s / len(batches) * 1000:8.1f} ms/batch  "
          f"end to end {min(end_to_end[1:]):7.3f} s")
  same = [p.ids for p in results[False][2]] == [p.ids for p in results[True][2]]
  print(f"  speed-up: prefill {results[False][0] / results[True][0]:.2f}x, end to end "
        f"{results[False][1] / results[True][1]:.2f}x; generated ids identical: {same}")


if __name__ == "__main__":
  main()

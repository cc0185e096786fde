"""Loader throughput of the data pipeline on the embedded corpus (no model).

    python scripts/benchmark_data.py [--batches=60] [--threads=0,1,2,4]

For span corruption (the quickstart's lengths) and the UL2 mixture (128 /
128), single process, prints examples/s and tokens/s (model positions,
padding included) per number of grain read threads, next to the token rate
the quickstart's train step consumes (measured on this machine: 32 x (128 +
29) tokens per 0.35-0.41 s step, ~13,000 tokens/s; `--train_tokens_per_s`).
The first batch (building the in-memory source and the iterator) is timed
separately as start-up.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import t5xlike.tasks.embedded  # noqa: F401  (registers the task)
from t5xlike.data import feature_converters, pipeline
from t5xlike.objectives import span_corruption, ul2

CONFIGS = {
    "span_corruption": (lambda: span_corruption.SpanCorruption(),
                        {"inputs": 128, "targets": 29}),
    "ul2": (lambda: ul2.UL2(), {"inputs": 128, "targets": 128}),
}


def measure(name: str, threads: int, batches: int, batch_size: int) -> dict[str, float]:
  make_objective, lengths = CONFIGS[name]
  start = time.perf_counter()
  feed = pipeline.Pipeline("embedded_corpus", "train", lengths, batch_size, make_objective(),
                           num_threads=threads)
  first = next(feed)
  startup = time.perf_counter() - start
  start = time.perf_counter()
  tokens = 0
  for _ in range(batches):
    tokens += feature_converters.tokens_per_batch(next(feed))
  seconds = time.perf_counter() - start
  feed.close()
  del first
  return {"startup_s": startup, "examples_per_s": batches * batch_size / seconds,
          "tokens_per_s": tokens / seconds}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=60)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--threads", default="0,1,2,4")
  parser.add_argument("--train_tokens_per_s", type=float, default=13_000.0)
  args = parser.parse_args()
  print(f"{'objective':16s} {'threads':>7s} {'start-up s':>10s} {'examples/s':>11s} "
        f"{'tokens/s':>10s} {'x train step':>12s}")
  for name in CONFIGS:
    for threads in (int(t) for t in args.threads.split(",")):
      row = measure(name, threads, args.batches, args.batch_size)
      print(f"{name:16s} {threads:7d} {row['startup_s']:10.1f} {row['examples_per_s']:11,.0f} "
            f"{row['tokens_per_s']:10,.0f} {row['tokens_per_s'] / args.train_tokens_per_s:12.1f}")


if __name__ == "__main__":
  main()

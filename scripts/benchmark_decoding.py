"""Decode throughput of the KV-cache decoding: tokens/s per method, model and batch size.

  python scripts/benchmark_decoding.py [--model=t5_1_1/tiny] [--batch_sizes=1,32] \
      [--max_length=32] [--repeats=3]

Random parameters (speed does not depend on them); every row decodes exactly
`max_length` tokens (no EOS can stop it early: eos_id is set outside the
vocabulary). Prints one line per (method, batch size): compile seconds,
seconds per batch, generated tokens/s (beam search: tokens of the returned
best beam, i.e. batch x max_length per call).
"""
from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import gin
import jax
import numpy as np

from t5xlike.cli import gin_config
from t5xlike.data import feature_converters
from t5xlike.inference import decoding, predictor


def build(model_gin: str, input_length: int):
  gin_config.configure([f"models/{model_gin}.gin"])
  model = gin.query_parameter("%MODEL").scoped_configurable_fn()
  gin.clear_config()
  features = predictor.example_features(model, {"inputs": input_length, "targets": 1})
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), features)["params"])
  return model, params


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="t5_1_1/tiny", help="a gin_configs/models/ name")
  parser.add_argument("--batch_sizes", default="1,32")
  parser.add_argument("--input_length", type=int, default=64)
  parser.add_argument("--max_length", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  gin_config.quiet_gin_search_logs()
  model, params = build(args.model, args.input_length)
  print(f"{args.model}: {sum(x.size for x in jax.tree.leaves(params)):,} parameters, "
        f"{jax.devices()[0].device_kind}, inputs {args.input_length}, decode {args.max_length}")
  methods = {"greedy": decoding.DecodingConfig(),
             "sample (top_p 0.9)": decoding.DecodingConfig(method="sample", top_p=0.9),
             "beam (4 beams)": decoding.DecodingConfig(method="beam", num_beams=4)}
  rng = np.random.default_rng(0)
  for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
    examples = [{"inputs": rng.integers(2, 1000, args.input_length - 1).astype(np.int32),
                 "targets": np.zeros((0,), np.int32)} for _ in range(batch_size)]
    convert = functools.partial(feature_converters.get_converter(
        model.feature_converter), feature_lengths={"inputs": args.input_length, "targets": 1})
    batch = convert(examples)
    for name, method in methods.items():
      fn = jax.jit(functools.partial(model.predict_batch, config=method,
                                     max_length=args.max_length, eos_id=model.vocab_size + 1))
      start = time.perf_counter()
      compiled = fn.lower(params, batch, rng=jax.random.key(0)).compile()
      compile_s = time.perf_counter() - start
      jax.block_until_ready(compiled(params, batch, rng=jax.random.key(0)))
      start = time.perf_counter()
      for i in range(args.repeats):
        jax.block_until_ready(compiled(params, batch, rng=jax.random.key(i)))
      per_call = (time.perf_counter() - start) / args.repeats
      print(f"  batch {batch_size:4d}  {name:20s} compile {compile_s:6.2f} s  "
            f"{per_call * 1000:8.1f} ms/batch  {batch_size * args.max_length / per_call:10,.0f} "
            f"tokens/s")


if __name__ == "__main__":
  main()

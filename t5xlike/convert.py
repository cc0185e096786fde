"""Converts checkpoints: `python -m t5xlike.convert --from=t5x|hf|t5xlike --to=t5xlike|hf
--checkpoint=IN --output=OUT`.

  # A T5X checkpoint (T5.1.1 / mT5 / Flan-T5; UL2: --mlp_activation=silu) -> t5xlike:
  python -m t5xlike.convert --from=t5x --checkpoint=t5x_run/checkpoint_1000000 --output=OUT \
    [--vocabulary=spiece.model]
  # A Hugging Face T5 / mT5 / Llama-style directory -> t5xlike:
  python -m t5xlike.convert --from=hf --checkpoint=HF_DIR --output=OUT
  # t5xlike -> Hugging Face (the model gin: --gin_file, default model.gin beside the checkpoint):
  python -m t5xlike.convert --from=t5xlike --to=hf --checkpoint=OUT/checkpoint --output=HF_DIR

A t5xlike OUT holds OUT/checkpoint (step 0) and OUT/model.gin (see
`t5xlike/interop/output_dir.py`); an HF OUT holds config.json and
model.safetensors (float32). Every tensor's path, shape and source dtype is
logged; a shape that does not fit the model is an error naming its path.
Exit codes: 0 done, 2 bad input (one line on stderr, nothing written:
OUT is written under a temporary name and renamed when complete).
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil
import sys
from typing import Any, Sequence

from t5xlike import errors
from t5xlike.cli import flags, gin_config

log = logging.getLogger("t5xlike.convert")
SOURCES = ("t5x", "hf", "t5xlike")
TARGETS = ("t5xlike", "hf")


def _flags(parser) -> None:
  parser.add_argument("--from", dest="source", choices=SOURCES, required=True)
  parser.add_argument("--to", dest="target", choices=TARGETS, default="t5xlike")
  parser.add_argument("--checkpoint", required=True,
                      help="T5X step dir, HF model dir, or t5xlike step dir")
  parser.add_argument("--output", required=True, help="directory to create")
  parser.add_argument("--vocabulary", default=None,
                      help="SentencePiece .model to use (default: the source's, if any)")
  parser.add_argument("--scan_layers", choices=("auto", "true", "false"), default="auto",
                      help="t5xlike output layout (auto: as the source)")
  parser.add_argument("--mlp_activation", default="gelu",
                      help="T5X sources: the MLP activation the arrays cannot tell "
                           "(gelu: T5.1.1/mT5/Flan-T5; silu: UL2; relu: T5 v1.0)")
  parser.add_argument("--relative_attention_max_distance", type=int, default=128,
                      help="T5X sources: T5's relative position max distance (128 in every "
                           "released T5X model)")
  parser.add_argument("--max_position_embeddings", type=int, default=2048,
                      help="HF Llama export: max_position_embeddings of config.json")


def _validate(args) -> None:
  if args.source == args.target:
    raise errors.ConfigError(f"--from and --to are both {args.source}")
  if not pathlib.Path(args.checkpoint).is_dir():
    raise errors.ConfigError(f"--checkpoint={args.checkpoint}: no such directory")
  output = pathlib.Path(args.output)
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise errors.ConfigError(f"--output={args.output} exists and is not empty")
  if args.vocabulary and not pathlib.Path(args.vocabulary).is_file():
    raise errors.ConfigError(f"--vocabulary={args.vocabulary}: no such file")
  if args.source != "t5xlike" and (args.gin_file or args.gin_overrides or args.gin_bindings):
    raise errors.ConfigError("--gin_file / --gin.* are for --from=t5xlike (the model gin)")


def _scan(args, source_scanned: bool) -> bool:
  return source_scanned if args.scan_layers == "auto" else args.scan_layers == "true"


def _logged(pairs, dtypes: dict[str, str]):
  import numpy as np  # pylint: disable=g-import-not-at-top
  for name, value in pairs:
    dtypes[name] = str(value.dtype)
    log.info("  %s %s %s", name, tuple(value.shape), value.dtype)
    yield name, np.asarray(value, np.float32)


def load_source(args) -> tuple[Any, dict, Any]:
  """(network config, unscanned float32 parameters, interop Vocabulary) of the source."""
  from t5xlike.interop import (hf_dir, network_shapes, output_dir, param_trees,  # pylint: disable=g-import-not-at-top
                               t5x_format)
  dtypes: dict[str, str] = {}
  log.info("reading %s checkpoint %s", args.source, args.checkpoint)
  if args.source == "hf":
    network_config, pairs, vocabulary = hf_dir.read(args.checkpoint, _scan(args, False),
                                                    args.vocabulary)
    flat = dict(_logged(pairs, dtypes))
  elif args.source == "t5x":
    scanned, pairs = t5x_format.read(args.checkpoint)
    flat = dict(_logged(pairs, dtypes))
    network_config = t5x_format.t5_config({n: v.shape for n, v in flat.items()},
                                          args.mlp_activation,
                                          args.relative_attention_max_distance,
                                          scan_layers=_scan(args, scanned))
    vocabulary = output_dir.Vocabulary()
    if args.vocabulary:
      vocabulary = output_dir.Vocabulary(
          args.vocabulary, output_dir.t5_extra_ids(args.vocabulary, network_config.vocab_size))
  else:
    gin_files = list(args.gin_file)
    if not gin_files:
      beside = pathlib.Path(args.checkpoint).resolve().parent / output_dir.MODEL_GIN
      if not beside.is_file():
        raise errors.ConfigError(f"--from=t5xlike needs the model gin: --gin_file=... "
                                 f"(no {beside})")
      gin_files = [str(beside)]
    gin_config.configure(gin_files, args.gin_overrides, args.gin_bindings, args.gin_search_paths)
    model = output_dir.configured_model()
    network_config = model.network.config
    flat = output_dir.read_params(args.checkpoint, network_config)
    flat = dict(_logged(flat.items(), dtypes))
    vocabulary = output_dir.sentencepiece_file(model.vocabulary)
    if args.vocabulary:
      vocabulary = output_dir.Vocabulary(args.vocabulary, vocabulary.extra_ids)
  expected = network_shapes.param_shapes(dataclasses.replace(network_config, scan_layers=False))
  param_trees.check_shapes(flat, expected, args.checkpoint)
  log.info("%d tensors, %s parameters (source dtypes: %s) -> float32", len(flat),
           f"{sum(v.size for v in flat.values()):,}", ", ".join(sorted(set(dtypes.values()))))
  return network_config, flat, vocabulary


def convert(args) -> pathlib.Path:
  """Reads the source, then writes OUT under a temporary name and renames it."""
  from t5xlike.interop import hf_dir, output_dir  # pylint: disable=g-import-not-at-top
  try:
    network_config, flat, vocabulary = load_source(args)
  except (ValueError, KeyError) as error:
    raise errors.ConfigError(errors.one_line(error).strip('"')) from None
  output = pathlib.Path(args.output)
  temporary = output.parent / f".{output.name}.incomplete"
  shutil.rmtree(temporary, ignore_errors=True)
  if args.target == "t5xlike":
    output_dir.write(temporary, network_config, flat, vocabulary, final=output)
  else:
    hf_dir.write(temporary, network_config, flat, vocabulary, args.max_position_embeddings)
  if output.exists():
    output.rmdir()  # Empty (checked by _validate).
  temporary.rename(output)
  log.info("wrote %s (%s)", output, args.target)
  return output


def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                      datefmt="%H:%M:%S", stream=sys.stdout)
  logging.getLogger("t5xlike").setLevel(logging.INFO)
  gin_config.quiet_gin_search_logs()
  parser = flags.build_parser(__doc__.splitlines()[0])
  _flags(parser)
  try:
    args = flags.parse_args(parser, sys.argv[1:] if argv is None else argv)
    _validate(args)
    convert(args)
  except errors.ConfigError as error:
    print(f"error: {errors.one_line(error)}", file=sys.stderr)
    return 2
  except SystemExit as error:  # argparse: a missing or invalid flag.
    return int(error.code or 0)
  return 0


if __name__ == "__main__":
  sys.exit(main())

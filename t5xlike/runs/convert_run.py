"""The run behind `python -m t5xlike.convert`: read a checkpoint of one format, write another.

`validate` checks the flags (nothing read); `convert` reads the source into
unscanned float32 NumPy parameters (logging each tensor) and writes OUT under
a temporary name, renamed when complete (`t5xlike.interop` has the formats).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import shutil
from typing import Any

import numpy as np

from t5xlike import errors, progress
from t5xlike.cli import gin_config
from t5xlike.interop import hf_dir, network_shapes, output_dir, param_trees, t5x_format

log = logging.getLogger("t5xlike.convert")


def validate(args: argparse.Namespace) -> None:
  """Checks the flags and paths before anything is read or written (ConfigError)."""
  if args.source == args.target:
    raise errors.ConfigError(f"--from and --to are both {args.source}")
  checkpoint = pathlib.Path(args.checkpoint)
  if not checkpoint.is_dir():
    raise errors.ConfigError(f"--checkpoint={args.checkpoint}: "
                             f"{'not a directory' if checkpoint.exists() else 'no such directory'}")
  output = pathlib.Path(args.output)
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise errors.ConfigError(f"--output={args.output} exists and is not empty")
  if args.vocabulary and not pathlib.Path(args.vocabulary).is_file():
    raise errors.ConfigError(f"--vocabulary={args.vocabulary}: no such file")
  if args.source != "t5xlike" and (args.gin_file or args.gin_overrides or args.gin_bindings):
    raise errors.ConfigError("--gin_file / --gin.* are for --from=t5xlike (the model gin)")


def _scan(args, source_scanned: bool) -> bool:
  return source_scanned if args.scan_layers == "auto" else args.scan_layers == "true"


def _logged(pairs, dtypes: dict[str, str], total: int | None = None):
  """The (name, float32 array) pairs, each logged; the reading's progress shown
  (`t5xlike.progress`: of `total` tensors, when known)."""
  with progress.Progress("reading the checkpoint", total, unit="tensors") as shown:
    for name, value in pairs:
      dtypes[name] = str(value.dtype)
      log.info("  %s %s %s", name, tuple(value.shape), value.dtype)
      yield name, np.asarray(value, np.float32)
      shown.update()


def _tensor_count(network_config: Any) -> int:
  """The unscanned parameter tensors of a network config."""
  return len(network_shapes.param_shapes(dataclasses.replace(network_config, scan_layers=False)))


def load_source(args) -> tuple[Any, dict, Any]:
  """(network config, unscanned float32 parameters, interop Vocabulary) of the source."""
  dtypes: dict[str, str] = {}
  log.info("reading %s checkpoint %s", args.source, args.checkpoint)
  if args.source == "hf":
    network_config, pairs, vocabulary = hf_dir.read(args.checkpoint, _scan(args, False),
                                                    args.vocabulary)
    flat = dict(_logged(pairs, dtypes, _tensor_count(network_config)))
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
    checkpoint, beside = output_dir.locate(args.checkpoint)
    gin_files = list(args.gin_file) or ([str(beside)] if beside else [])
    if not gin_files:
      raise errors.ConfigError(
          f"--from=t5xlike needs the model gin: --gin_file=..., or {output_dir.MODEL_GIN} "
          f"(a convert output) or {output_dir.RUN_CONFIG_GIN} (a training run) beside "
          f"--checkpoint={args.checkpoint}")
    # A run's operative config binds the whole run: its modules that this process cannot
    # import (the run's own task or objective code) are skipped; MODEL needs none of them.
    operative = not args.gin_file and beside is not None and (
        beside.name == output_dir.RUN_CONFIG_GIN)
    if operative:
      log.info("the model of %s", beside)
    gin_config.configure(gin_files, args.gin_overrides, args.gin_bindings, args.gin_search_paths,
                         skip_unknown=operative)
    model = output_dir.configured_model()
    network_config = model.network.config
    flat = output_dir.read_params(checkpoint, network_config)
    flat = dict(_logged(flat.items(), dtypes, len(flat)))
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
    try:
      hf_dir.write(temporary, network_config, flat, vocabulary, args.max_position_embeddings,
                   args.hf_model_type)
    except ValueError as error:  # The network has no such HF family: nothing left behind.
      shutil.rmtree(temporary, ignore_errors=True)
      raise errors.ConfigError(errors.one_line(error).strip('"')) from None
  if output.exists():
    output.rmdir()  # Empty (checked by validate).
  temporary.rename(output)
  log.info("wrote %s (%s)", output, args.target)
  return output

"""The run behind `python -m t5xlike.convert`: read a checkpoint of one format, write another.

`validate` checks the flags (nothing read); `convert` reads the source into
unscanned float32 NumPy parameters (logging each tensor) and writes OUT under
a temporary name, renamed when complete (`t5xlike.interop` has the formats).
`--from=peft` imports a Hugging Face PEFT LoRA adapter for a t5xlike base
(`import_peft`, `interop/hf_peft.py`).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from t5xlike import checkpoints, errors, progress
from t5xlike.cli import gin_config
from t5xlike.finetuning import lora, peft_checkpoint
from t5xlike.interop import hf_dir, hf_peft, network_shapes, output_dir, param_trees, t5x_format

log = logging.getLogger("t5xlike.convert")
#: The gin file of a `--from=peft` output: its LoRA settings and INITIAL_CHECKPOINT_PATH.
LORA_GIN = "lora.gin"


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
  if args.source not in ("t5xlike", "peft") and (args.gin_file or args.gin_overrides
                                                  or args.gin_bindings):
    raise errors.ConfigError("--gin_file / --gin.* are for --from=t5xlike and --from=peft "
                             "(the model gin)")
  if (args.source == "peft") != bool(args.base):
    raise errors.ConfigError("--base (the t5xlike base checkpoint) goes with --from=peft, "
                             "and only with it")
  if args.source == "peft" and args.target != "t5xlike":
    raise errors.ConfigError(f"--from=peft --to={args.target}: a PEFT adapter converts to "
                             "t5xlike (the LoRA export writes Hugging Face PEFT's files)")
  if args.base and not pathlib.Path(args.base).is_dir():
    raise errors.ConfigError(f"--base={args.base}: no such directory")


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


def t5xlike_model(args, path: str, flag: str) -> tuple[pathlib.Path, Any]:
  """(the step directory, the configured MODEL) of a t5xlike checkpoint named by `flag`:
  the model gin is --gin_file, else model.gin or a run's config.gin beside it."""
  checkpoint, beside = output_dir.locate(path)
  gin_files = list(args.gin_file) or ([str(beside)] if beside else [])
  if not gin_files:
    raise errors.ConfigError(
        f"--from={args.source} needs the model gin: --gin_file=..., or {output_dir.MODEL_GIN} "
        f"(a convert output) or {output_dir.RUN_CONFIG_GIN} (a training run) beside "
        f"{flag}={path}")
  # A run's operative config binds the whole run: its modules that this process cannot
  # import (the run's own task or objective code) are skipped; MODEL needs none of them.
  operative = not args.gin_file and beside is not None and (
      beside.name == output_dir.RUN_CONFIG_GIN)
  if operative:
    log.info("the model of %s", beside)
  gin_config.configure(gin_files, args.gin_overrides, args.gin_bindings, args.gin_search_paths,
                       skip_unknown=operative)
  return checkpoint, output_dir.configured_model()


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
    checkpoint, model = t5xlike_model(args, args.checkpoint, "--checkpoint")
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


def import_peft(args, directory: pathlib.Path, final: pathlib.Path) -> None:
  """Writes the LoRA adapter of a Hugging Face PEFT directory (--checkpoint) for the
  t5xlike base checkpoint --base as `directory/checkpoint` (a PEFT checkpoint, step 0:
  the LoRA parameters in the base's layout, `peft.json` naming --base) and
  `directory/lora.gin` (the LoRA macros and INITIAL_CHECKPOINT_PATH, under `final`,
  for `finetune/lora.gin`). ValueError naming the culprit when the adapter does not
  fit the base."""
  base_step, model = t5xlike_model(args, args.base, "--base")
  network_config = model.network.config
  try:
    shapes = network_shapes.param_shapes(network_config)
  except TypeError as error:
    raise ValueError(f"--base={args.base}: {error}") from None
  checkpoints.check_param_shapes(base_step, shapes)
  if network_config.scan_layers:
    shapes = param_trees.unstacked_shapes(shapes)
  config = hf_peft.read_config(args.checkpoint)
  unchecked = hf_peft.check_named_base(config, network_config, f"--base={args.base}")
  if unchecked:
    log.info("%s", unchecked)
  settings, flat = hf_peft.read(args.checkpoint, shapes, f"--base={args.base}")
  method = lora.LoRA(rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout,
                     targets=settings.targets)
  log.info("%s: %d LoRA tensors for %s", method, len(flat), base_step)
  params = param_trees.stack(flat) if network_config.scan_layers else flat
  checkpoints.save_params_at(directory / output_dir.CHECKPOINT, 0, param_trees.unflatten(params))
  peft_checkpoint.write_record(directory / output_dir.CHECKPOINT, method, 0, str(base_step))
  (directory / LORA_GIN).write_text("\n".join([
      f"# Written by `python -m t5xlike.convert --from=peft --checkpoint={args.checkpoint}`:",
      "# continue training this LoRA with --gin_file=gin_configs/finetune/lora.gin "
      f"--gin_file={final / LORA_GIN}",
      f"LORA_RANK = {settings.rank}", f"LORA_ALPHA = {settings.alpha!r}",
      f"LORA_DROPOUT = {settings.dropout!r}", f"LORA_TARGETS = {settings.targets!r}",
      f"INITIAL_CHECKPOINT_PATH = {str(final.resolve() / output_dir.CHECKPOINT)!r}", ""]))


def convert(args) -> pathlib.Path:
  """Reads the source, then writes OUT under a temporary name and renames it."""
  output = pathlib.Path(args.output)
  if args.source == "peft":
    return _publish(output, lambda temporary: import_peft(args, temporary, output),
                    f"a LoRA PEFT checkpoint and {LORA_GIN}", (ValueError, KeyError))
  try:
    network_config, flat, vocabulary = load_source(args)
  except (ValueError, KeyError) as error:
    raise errors.ConfigError(errors.one_line(error).strip('"')) from None
  if args.target == "t5xlike":
    return _publish(output, lambda temporary: output_dir.write(
        temporary, network_config, flat, vocabulary, final=output), args.target, ())
  # A ValueError: the network has no such HF family (nothing left behind).
  return _publish(output, lambda temporary: hf_dir.write(
      temporary, network_config, flat, vocabulary, args.max_position_embeddings,
      args.hf_model_type), args.target, (ValueError,))


def _publish(output: pathlib.Path, write: Callable[[pathlib.Path], object], what: str,
             refused: tuple[type[Exception], ...]) -> pathlib.Path:
  """`write(temporary)` into OUT's temporary name (`.OUT.incomplete`), then renamed to OUT
  (an empty OUT, checked by `validate`, is replaced). An exception of the `refused` kinds
  removes the temporary directory and is a one-line ConfigError."""
  temporary = output.parent / f".{output.name}.incomplete"
  shutil.rmtree(temporary, ignore_errors=True)
  try:
    write(temporary)
  except refused as error:
    shutil.rmtree(temporary, ignore_errors=True)
    raise errors.ConfigError(errors.one_line(error).strip('"')) from None
  if output.exists():
    output.rmdir()  # Empty (checked by validate).
  temporary.rename(output)
  log.info("wrote %s (%s)", output, what)
  return output

"""PEFT checkpoints: the trained parameters only, plus the base checkpoint's path.

`export` (the technique's `FineTuning.export`, called by `train_run.train`
after the final step) writes

  MODEL_DIR/peft/checkpoint_<N>/state      orbax {step, params}: only the
                                           trained parameters (LoRA's A, B...)
  MODEL_DIR/peft/checkpoint_<N>/peft.json  {"format", "base_checkpoint": the
                                           INITIAL_CHECKPOINT_PATH (absolute),
                                           "method": the technique and its fields}

and for a technique with `merge` (LoRA) also `MODEL_DIR/merged/checkpoint_<N>`,
the merged weights as a plain base-architecture checkpoint.

Loading restores the full model: `checkpoints.restore_matching_params`
follows `base_checkpoint` (restores the base, then lays the PEFT
parameters over it), so INITIAL_CHECKPOINT_PATH may name a PEFT
checkpoint; `checkpoint_loading.load_model_checkpoint` (eval / infer with
CHECKPOINT_PATH) rebuilds the wrapped model from `method` (`method_of`, which
finds the technique in `peft_registry` by its recorded name).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from t5xlike import checkpoints, interfaces
from t5xlike.finetuning import peft_registry

FORMAT = "t5xlike-peft-1"


@runtime_checkable
class Merging(Protocol):
  """A PEFT method that folds itself into the base architecture's parameters (LoRA)."""

  def merge(self, params: Any) -> Any:
    """The base architecture's parameters with the technique folded in."""
    ...


def _absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def trained_params(method: interfaces.FineTuningTechnique, params: Any) -> dict[str, Any]:
  """The leaves `method` trains (any of their layers), as a nested dict, and the frozen
  ones it adds and keeps (a method's `export_mask`: DSEE's sparse support)."""
  export_mask = getattr(method, "export_mask", None)
  masks = export_mask(params) if export_mask is not None else method.trainable(params)
  flat = traverse_util.flatten_dict(params)
  flat_masks = traverse_util.flatten_dict(masks)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items()
                                       if np.asarray(flat_masks[k]).any()})


def export(method: peft_registry.Method, params: Any, model_dir: Any, step: int,
           base_checkpoint: str | None) -> list[epath.Path]:
  """Writes the PEFT checkpoint (and LoRA's merged one); returns their directories.

  Args:
    method: a registered PEFT method (`peft.PeftMethod`, `peft_registry`); a
      `Merging` one also writes `model_dir/merged/checkpoint_<step>`.
    params: the run's full parameter tree (unboxed).
    model_dir: MODEL_DIR (a path or string).
    step: the final step, the checkpoints' number.
    base_checkpoint: INITIAL_CHECKPOINT_PATH, recorded (absolute) in `peft.json`; None: none.
  """
  model_dir = epath.Path(model_dir)
  directory = checkpoints.save_params(model_dir / "peft", step, trained_params(method, params))
  if jax.process_index() == 0:
    write_record(directory, method, step, base_checkpoint)
  written = [directory]
  if isinstance(method, Merging):
    written.append(checkpoints.save_params(model_dir / "merged", step, method.merge(params)))
  return written


def write_record(directory: str | epath.Path, method: peft_registry.Method, step: int,
                 base_checkpoint: str | None) -> None:
  """Writes `directory/peft.json`: the format, `step`, the method's record and the base
  checkpoint (absolute; None: none), making a step directory of the trained parameters
  (`checkpoints.save_params_at`) a PEFT checkpoint."""
  info = {"format": FORMAT, "step": int(step), "method": peft_registry.method_to_json(method),
          "base_checkpoint": _absolute(str(base_checkpoint)) if base_checkpoint else None}
  (epath.Path(directory) / checkpoints.PEFT_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read(path: str | epath.Path) -> dict[str, Any] | None:
  """The `peft.json` of a step directory, or None for an ordinary checkpoint."""
  info = checkpoints.peft_info(path)
  if info is not None and info.get("format") != FORMAT:
    raise ValueError(f"{path}: unknown PEFT checkpoint format {info.get('format')!r}")
  return info


def peft_parameters(paths: Iterable[str]) -> list[str]:
  """The paths among `paths` that name a PEFT technique's parameters (LoRA's A/B, ...)."""
  patterns = [pattern for cls in peft_registry.method_classes().values()
              for pattern in (cls.param_pattern, getattr(cls, "export_pattern", ""))
              if pattern]
  return sorted(p for p in paths if any(re.search(pattern, p) for pattern in patterns))


def method_of(path: str | epath.Path) -> peft_registry.Method | None:
  """The technique of a PEFT checkpoint (a `peft.PeftMethod`; None for an ordinary
  checkpoint)."""
  info = read(path)
  return None if info is None else peft_registry.method_from_json(info["method"])

"""The run behind `python -m t5xlike.inspect_data`: a task's examples as the model sees them.

`inspect` reads the task, TASK_FEATURE_LENGTHS, RANDOM_SEED and the objective
of the loaded gin files (those of `python -m t5xlike.train`), prints examples
(decoded, sentinels visible, loss positions) and their statistics.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import gin
import numpy as np

from t5xlike import errors, interfaces
from t5xlike.data import pipeline
from t5xlike.objectives import ul2
from t5xlike.objectives.base import Objective
from t5xlike.runs import train_plan


def _decode(vocabulary, ids: np.ndarray, extra_names: dict[int, str]) -> str:
  """Text of token ids (padding dropped); ids past the vocabulary print by name."""
  pieces: list[str] = []
  run: list[int] = []
  for i in (int(i) for i in ids if i > 0):
    if i in extra_names or i >= vocabulary.vocab_size:
      if run:
        pieces.append(vocabulary.decode(run))
        run = []
      pieces.append(extra_names.get(i, f"<id {i}>"))
    else:
      run.append(i)
  if run:
    pieces.append(vocabulary.decode(run))
  return " ".join(pieces)


def _summary(name: str, totals: dict[str, float]) -> dict[str, object]:
  count = int(totals["examples"])
  row: dict[str, object] = {"name": name, "examples": count}
  original = totals.get("original_tokens", 0)
  noise = totals.get("noise_tokens", totals.get("masked_tokens"))
  row["noise_density"] = noise / original if original and noise is not None else None
  row["mean_noise_span_length"] = (totals["noise_tokens"] / max(totals["noise_spans"], 1)
                                   if "noise_spans" in totals else None)
  if "masked_tokens" in totals:
    row["mask_rate"] = totals["masked_tokens"] / max(original, 1)
  row["mean_inputs_length"] = totals["inputs_length"] / max(count, 1)
  row["mean_targets_length"] = totals["targets_length"] / max(count, 1)
  return row


def _macro(name: str):
  """A macro's value, or None when no loaded gin file binds it."""
  try:
    return gin.query_parameter(f"%{name}")
  except ValueError:
    return None


def _configured_model() -> interfaces.Model | None:
  """The model `train_run.train` would build (for its feature converter), or None."""
  reference = gin.query_parameter("train_run.train.model")
  if isinstance(reference, gin.config.ConfigurableReference):
    return reference.scoped_configurable_fn()
  macro = gin.query_parameter("%MODEL")
  return macro.scoped_configurable_fn() if macro is not None else None


def _loss_mask(batch: dict[str, np.ndarray]) -> np.ndarray:
  """The positions of the model's row that carry loss (bool [length])."""
  for key in ("decoder_loss_weights", "mlm_weights"):
    if key in batch:
      return batch[key][0] > 0
  return np.zeros((0,), bool)


def _ranges(mask: np.ndarray) -> str:
  """'3-5, 9' for a mask True at 3, 4, 5 and 9."""
  spans, start = [], None
  for i, on in enumerate(list(mask) + [False]):
    if on and start is None:
      start = i
    elif not on and start is not None:
      spans.append(f"{start}-{i - 1}" if i - 1 > start else f"{start}")
      start = None
  return ", ".join(spans) or "none"


def inspect(num_examples: int, split: str, as_json: bool,
            out: TextIO | None = None) -> list[dict[str, object]]:
  """Prints examples and statistics of the configured run; returns the statistics rows.

  One row per objective, or per denoiser of a mixture such as UL2 (in the
  table's order).
  """
  out = out or sys.stdout
  feed, objective, converter = _configured_feed(split)
  lengths = feed.feature_lengths
  extra_names = objective.extra_token_names(feed.vocabulary.vocab_size) if objective else {}
  totals: dict[str, dict[str, float]] = {}
  with contextlib.closing(feed.examples()) as examples:
    for index, (raw, features) in enumerate(itertools.islice(examples, num_examples)):
      name = objective.row_name(features) if objective else "supervised"
      _add_counts(totals.setdefault(name, {}), objective, raw, features)
      if not as_json:
        loss_mask = _loss_mask(feed.convert([features], lengths))
        print(f"--- example {index} ({name}, {converter} features)", file=out)
        for key in ("inputs", "targets"):
          if key in features:
            limit = lengths.get(key, lengths.get("inputs"))
            extra = f", loss on {int(loss_mask.sum())}" if key == "targets" else ""
            print(f"{key:7s} [{len(features[key])} -> {limit}{extra}]: "
                  f"{_decode(feed.vocabulary, features[key][:limit], extra_names)}", file=out)
        print(f"loss mask (positions of the {len(loss_mask)}-token model row): "
              f"{_ranges(loss_mask)}", file=out)
  order = [d.name for d in objective.denoisers] if isinstance(objective, ul2.UL2) else []
  names = sorted(totals, key=lambda n: (order.index(n) if n in order else len(order), n))
  rows = [_summary(name, totals[name]) for name in names]
  for row in rows:
    if as_json:
      print(json.dumps(row), file=out)
    else:
      print("--- statistics: " + ", ".join(
          f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
            file=out)
  return rows


def _configured_feed(split: str) -> tuple[Any, Objective | None, str]:
  """(a one-epoch, unshuffled feed of `split` with batch size 1, the objective, the feature
  converter's name), from the loaded gin files' macros and `train_run.train`'s bindings."""
  train_plan.import_task_module(gin.query_parameter("%MIXTURE_OR_TASK_MODULE"))
  reference = gin.query_parameter("train_run.train.objective")
  objective = reference.scoped_configurable_fn() if reference is not None else None
  model = _configured_model()
  converter = model.feature_converter if model is not None else "encoder_decoder"
  try:
    feed = pipeline.make_feed(gin.query_parameter("%MIXTURE_OR_TASK_NAME"), split,
                              gin.query_parameter("%TASK_FEATURE_LENGTHS"),
                              batch_size=1, objective=objective,
                              seed=gin.query_parameter("%RANDOM_SEED"), num_epochs=1,
                              feature_converter=converter,
                              use_cached=gin.query_parameter("%USE_CACHED_TASKS"),
                              cache_dir=_macro("TASK_CACHE_DIR"), shuffle=False, num_threads=0)
  except ValueError as error:
    raise errors.ConfigError(errors.one_line(error)) from None
  return feed, objective, converter


def _add_counts(row: dict[str, float], objective: Objective | None,
                raw: Mapping[str, np.ndarray], features: Mapping[str, np.ndarray]) -> None:
  """Adds one example's counts (the objective's, and the lengths) to its row's totals."""
  if objective:
    for key, value in objective.example_stats(raw[objective.source_feature], features).items():
      row[key] = row.get(key, 0) + value
  row["examples"] = row.get("examples", 0) + 1
  row["inputs_length"] = row.get("inputs_length", 0) + len(features.get("inputs", ()))
  row["targets_length"] = row.get("targets_length", 0) + len(features.get("targets", ()))

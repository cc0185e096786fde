"""The inference run that `python -m t5xlike.infer` executes (gin root `infer`).

Input: a JSONL file (`--input`; or a `.tsv` file of inputs TAB targets
text), one object per line with `inputs` (text,
encoded with VOCABULARY, EOS appended as the tasks' features do) or
`input_ids` (ids used exactly as given); for `--mode=score` also `targets`
(text, EOS appended) or `target_ids` (exactly as given). Output lines repeat
the input fields and add `prediction` + `prediction_ids` (predict; the
generated EOS kept in the ids) or `score` (summed natural-log likelihood of
the targets) + `token_scores` (score). Without `--input`, the examples of
MIXTURE_OR_TASK_NAME's `split` are read and written to
`INFER_OUTPUT_DIR/<task>-<step>.jsonl`.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from etils import epath

from t5xlike import decoding, errors, inference

from t5xlike.cli import entry

log = logging.getLogger(__name__)
MODES = ("predict", "score")


def _line_error(path, number: int, message: str) -> errors.ConfigError:
  return errors.ConfigError(f"{path}:{number}: {message}")


def _ids(value: Any, field: str, path, number: int, vocab_size: int | None) -> np.ndarray:
  if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
    raise _line_error(path, number, f"{field} must be a list of non-negative integers")
  ids = np.asarray(value, np.int32)
  if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
    raise _line_error(path, number, f"{field} holds id {int(ids.max())} but the model has "
                      f"{vocab_size} embeddings")
  return ids


def _text(value: Any, field: str, path, number: int, vocabulary) -> np.ndarray:
  if not isinstance(value, str):
    raise _line_error(path, number, f"{field} must be a string")
  if vocabulary is None:
    raise _line_error(path, number, f"{field} is text but the model has no VOCABULARY; "
                      f"give {field[:-1] if field.endswith('s') else field}_ids")
  return np.asarray(list(vocabulary.encode(value)) + [vocabulary.eos_id], np.int32)


def read_examples(path: str, mode: str, vocabulary, vocab_size: int | None
                  ) -> tuple[list[dict[str, Any]], list[dict[str, np.ndarray]]]:
  """(the input rows as read, model examples {'inputs', 'targets'}) of a JSONL
  file, or of a TSV file (`*.tsv`: inputs TAB targets, text, one per line).

  Raises ConfigError naming the file and line for: a missing, empty or
  non-UTF-8 file, a line that is not a JSON object, missing or malformed
  fields, ids outside the model's vocabulary.
  """
  file = epath.Path(path)
  if not file.exists():
    raise errors.ConfigError(f"--input={path}: no such file")
  try:
    text = file.read_bytes().decode("utf-8")
  except UnicodeDecodeError as error:
    raise errors.ConfigError(f"--input={path}: not UTF-8 text ({error.reason} at byte "
                             f"{error.start})") from None
  rows, examples = [], []
  tsv = str(path).endswith(".tsv")
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    if tsv:  # inputs TAB targets (the targets column is optional)
      row = dict(zip(("inputs", "targets"), line.split("\t", 1)))
    else:
      try:
        row = json.loads(line)
      except json.JSONDecodeError as error:
        raise _line_error(path, number, f"not JSON ({error.msg})") from None
      if not isinstance(row, dict):
        raise _line_error(path, number, "expected a JSON object")
    example = {}
    for name, text_field, ids_field in (("inputs", "inputs", "input_ids"),
                                        ("targets", "targets", "target_ids")):
      if ids_field in row:
        example[name] = _ids(row[ids_field], ids_field, path, number, vocab_size)
      elif text_field in row:
        example[name] = _text(row[text_field], text_field, path, number, vocabulary)
    if "inputs" not in example:
      raise _line_error(path, number, "needs 'inputs' (text) or 'input_ids'")
    if mode == "score" and "targets" not in example:
      raise _line_error(path, number, "--mode=score needs 'targets' (text) or 'target_ids'")
    rows.append(row)
    examples.append(example)
  if not examples:
    raise errors.ConfigError(f"--input={path}: the file holds no example")
  return rows, examples


def _decode(vocabulary, ids: Sequence[int]) -> str | None:
  if vocabulary is None:
    return None
  return vocabulary.decode([int(i) for i in ids])


def output_rows(mode: str, rows: Sequence[Mapping[str, Any]], results: Sequence[Any],
                vocabulary) -> list[dict[str, Any]]:
  """The input rows with `prediction` + `prediction_ids` or `score` + `token_scores`."""
  out = []
  for row, result in zip(rows, results):
    if mode == "predict":
      out.append({**row, "prediction": _decode(vocabulary, result.ids),
                  "prediction_ids": result.ids})
    else:
      out.append({**row, "score": result.total, "token_scores": result.token_scores})
  return out


def write_jsonl(path: str | epath.Path, rows: Iterable[Mapping[str, Any]]) -> epath.Path:
  """Writes rows atomically (a temporary file renamed over `path` when complete)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.parent / f".{path.name}.incomplete"
  temporary.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
  temporary.replace(path)
  return path


def infer(*, model: Any, checkpoint_path: str | None, task_feature_lengths: Mapping[str, int],
          batch_size: int, mode: str = "predict", input_path: str | None = None,
          output_path: str | None = None, max_decode_length: int | None = None,
          decoding_config: decoding.DecodingConfig | None = None,
          mixture_or_task_name: str | None = None, mixture_or_task_module: str | None = None,
          split: str = "validation", infer_output_dir: str | None = None,
          max_examples: int | None = None, use_cached_tasks: bool = False,
          task_cache_dir: str | None = None, mesh_shape: Mapping[str, int] | None = None,
          random_seed: int = 0) -> list[str]:
  """Predicts or scores examples with the parameters of CHECKPOINT_PATH; returns
  the output files written.

  Args:
    model: the model (its VOCABULARY encodes text and decodes predictions).
    checkpoint_path: CHECKPOINT_PATH, a step directory `.../checkpoint_<N>`.
    task_feature_lengths: TASK_FEATURE_LENGTHS: padded input / target lengths;
      'targets' is also the maximum decode length unless `max_decode_length`.
    batch_size: examples per compiled call.
    mode: 'predict' or 'score'.
    input_path, output_path: JSONL files (`--input`, `--output`); without
      `input_path`, the examples of `mixture_or_task_name`'s `split` go to
      `infer_output_dir/<task>-<step>.jsonl` (INFER_OUTPUT_DIR).
    decoding_config: greedy (default), sampling or beam search.
    max_examples: at most this many examples per task (task input only).
    random_seed: RANDOM_SEED, the sampling seed.
  """
  # ---- validation: nothing is written before this block has passed. ----
  if mode not in MODES:
    raise errors.ConfigError(f"--mode must be one of {MODES}, got {mode!r}")
  if not checkpoint_path:  # Checked first: reading the input is wasted without it.
    inference.load_checkpoint(model, checkpoint_path, task_feature_lengths, mesh_shape)
  errors.require_int("BATCH_SIZE", batch_size)
  if max_decode_length is not None:
    errors.require_int("--max_decode_length", max_decode_length)
  if input_path and not output_path:
    raise errors.ConfigError("--input needs --output (the JSONL file to write)")
  if not input_path and not (mixture_or_task_name and infer_output_dir):
    raise errors.ConfigError("give --input=F.jsonl --output=G.jsonl, or MIXTURE_OR_TASK_NAME "
                             "and INFER_OUTPUT_DIR for task-based inference")
  vocabulary = getattr(model, "vocabulary", None)
  vocab_size = getattr(model, "vocab_size", None)
  if input_path:
    rows, examples = read_examples(input_path, mode, vocabulary, vocab_size)
    jobs = [(None, rows, examples)]
  else:
    try:
      from t5xlike.data import task_examples  # pylint: disable=g-import-not-at-top
      jobs = task_examples.read_tasks(mixture_or_task_name, split, task_feature_lengths,
                                      module=mixture_or_task_module,
                                      use_cached=use_cached_tasks, cache_dir=task_cache_dir,
                                      max_examples=max_examples)
    except ValueError as error:
      raise errors.ConfigError(errors.one_line(error)) from None
  model, params, step = inference.load_model_checkpoint(model, checkpoint_path,
                                                       task_feature_lengths, mesh_shape)

  # ---- the run. ----
  entry.mark_run_started()
  eos_id = getattr(vocabulary, "eos_id", 1)
  predictor = inference.Predictor(model, params, task_feature_lengths, batch_size,
                                  decoding_config, max_decode_length, eos_id, seed=random_seed)
  written = []
  for task_name, rows, examples in jobs:
    results = predictor.predict(examples) if mode == "predict" else predictor.score(examples)
    out = output_rows(mode, rows, results, vocabulary)
    path = (output_path if task_name is None
            else epath.Path(infer_output_dir) / f"{task_name}-{step}.jsonl")
    written.append(str(write_jsonl(path, out)))
    stats = predictor.last_stats
    if mode == "predict":
      log.info("%s: %d examples, %d tokens generated in %.2f s: %.1f decode tokens/s -> %s",
               task_name or input_path, stats["examples"], stats["generated_tokens"],
               stats["seconds"], stats["decode_tokens_per_second"], path)
    else:
      log.info("%s: %d examples, %d target tokens scored in %.2f s -> %s",
               task_name or input_path, stats["examples"], stats["scored_tokens"],
               stats["seconds"], path)
  return written


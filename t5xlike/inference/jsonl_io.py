"""The file formats of `python -m t5xlike.infer`: reading examples, writing results.

Input: a JSONL file (`--input`; or a `.tsv` file of inputs TAB targets
text), one object per line (blank lines are skipped and counted in the
log) with `inputs` (text,
encoded with VOCABULARY, EOS appended as the tasks' features do) or
`input_ids` (ids used exactly as given); for `--mode=score` also `targets`
(text, EOS appended) or `target_ids` (exactly as given). Output lines repeat
the input fields and add `prediction` + `prediction_ids` (predict; the
generated EOS kept in the ids) or `score` (summed natural-log likelihood of
the targets) + `token_scores` (score). Without `--input`, the examples of
MIXTURE_OR_TASK_NAME's `split` are read and written to
`INFER_OUTPUT_DIR/<task>-<step>.jsonl`.

UL2 mode switching (`objectives.mode_switching`): a line's `mode` field (a
paradigm token such as "[S2S]", or null for none), else MODE_TOKEN, puts that
token's ids first in the inputs (text or ids), once: inputs that already
begin with them are left as they are.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from t5xlike import errors
from t5xlike.objectives import mode_switching as mode_switching_lib

MODES = ("predict", "score")

#: The field of a line that names its UL2 mode token.
MODE_FIELD = "mode"

log = logging.getLogger(__name__)


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


def read_examples(path: str, mode: str, vocabulary, vocab_size: int | None,
                  mode_switching: Any = None
                  ) -> tuple[list[dict[str, Any]], list[dict[str, np.ndarray]]]:
  """(the input rows as read, model examples {'inputs', 'targets'}) of a JSONL
  file, or of a TSV file (`*.tsv`: inputs TAB targets, text, one per line).

  Blank lines (whitespace only) are skipped; their count is logged. Line
  numbers in errors count them. Raises ConfigError naming the file and line
  for: a missing, empty or
  non-UTF-8 file, a line that is not a JSON object, missing or malformed
  fields, ids outside the model's vocabulary, a `mode` that is not a mode token the
  vocabulary holds. `mode_switching` (`objectives.mode_switching.ModeSwitching`): the
  paradigm tokens and MODE_TOKEN (its `default`); None: only UL2's tokens as text, no
  default.
  """
  if mode_switching is None:
    mode_switching = mode_switching_lib.ModeSwitching()
  file = epath.Path(path)
  if not file.exists():
    raise errors.ConfigError(f"--input={path}: no such file")
  try:
    text = file.read_bytes().decode("utf-8")
  except UnicodeDecodeError as error:
    raise errors.ConfigError(f"--input={path}: not UTF-8 text ({error.reason} at byte "
                             f"{error.start})") from None
  rows, examples = [], []
  blank = 0
  tsv = str(path).endswith(".tsv")
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      blank += 1
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
    example["inputs"] = _with_mode(example["inputs"], row, mode_switching, path, number,
                                   vocabulary, vocab_size)
    if mode == "score" and "targets" not in example:
      raise _line_error(path, number, "--mode=score needs 'targets' (text) or 'target_ids'")
    rows.append(row)
    examples.append(example)
  if not examples:
    raise errors.ConfigError(f"--input={path}: the file holds no example")
  if blank:
    log.info("%s: %d examples, %d blank lines skipped", path, len(examples), blank)
  return rows, examples


def _with_mode(inputs: np.ndarray, row: Mapping[str, Any], mode_switching, path, number: int,
               vocabulary, vocab_size: int | None) -> np.ndarray:
  """`inputs` with the line's mode token (or MODE_TOKEN) first, once."""
  token = row[MODE_FIELD] if MODE_FIELD in row else mode_switching.default
  if token is None:
    return inputs
  try:
    ids = mode_switching.token_ids(token, vocabulary, vocab_size)
  except errors.ConfigError as error:
    raise _line_error(path, number, str(error)) from None
  return mode_switching_lib.prepend_once(inputs, ids)


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
  return write_text_atomically(
      path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_text_atomically(path: str | epath.Path, text: str) -> epath.Path:
  """Writes `text` to `path` through a temporary file renamed over it when complete (a
  reader sees the old file or the whole new one); creates the directory."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.parent / f".{path.name}.incomplete"
  temporary.write_text(text)
  temporary.replace(path)
  return path



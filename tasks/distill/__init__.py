"""Sequence-level distillation tasks from a teacher's generated outputs ("Distilling Step-by-Step").

A teacher's outputs are written by `python -m t5xlike.infer` (task-based
inference: `INFER_OUTPUT_DIR/<task>-<step>.jsonl`, one row per example with
`inputs`, `targets` (the gold label) and `prediction` (what the teacher
generated)). `step_by_step(...)` registers, from such a file, the multitask
mixture of Hsieh et al. 2023 ("Distilling Step-by-Step! Outperforming Larger
Language Models with Less Training Data and Smaller Model Sizes", §3.2):

  <name>_label    "[label] " + inputs  -> targets      (the gold labels)
  <name>_teacher  "[rationale] " + inputs -> prediction (the teacher's output)
  <name>          the mixture of both, rates 1 : rationale_weight

so that the student trains on L = L_label + lambda L_rationale (in
expectation: examples are drawn from the two tasks in proportion to the
rates, the same inputs in both) and, at test time, is asked with the
"[label] " prefix only. In the paper the teacher is an LLM prompted to write
a rationale before its label; here the `prediction` field is whatever the
teacher was trained or prompted to generate (a rationale, or just its
label: with `prefixes=False` the mixture is sequence-level distillation,
Kim & Rush 2016, mixed with the gold labels). Splits: `train` and
`validation` are a 95 / 5 split of the file's rows by a hash of their inputs.

Use it from a task module of your own (named in MIXTURE_OR_TASK_MODULE):

    from t5xlike.tasks import distill
    distill.step_by_step('/tmp/teacher/mt_count_words-1400.jsonl', name='sbs_count')

then `--gin.MIXTURE_OR_TASK_NAME="'sbs_count'"`.
"""
from __future__ import annotations

import functools
import json
import pathlib
import zlib

import seqio
import tensorflow as tf

from t5xlike.tasks import embedded, multitask

SPLITS = ("train", "validation")
LABEL_PREFIX, RATIONALE_PREFIX = "[label] ", "[rationale] "


def _split_of(inputs: str) -> str:
  """'validation' for 5% of the rows (by a CRC-32 hash of their inputs), else 'train'."""
  return "validation" if zlib.crc32(inputs.encode("utf-8")) % 20 == 0 else "train"


@functools.cache
def read_outputs(path: str) -> tuple[dict[str, str], ...]:
  """The rows of an `infer` output file: {'inputs', 'targets', 'prediction'} strings."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise ValueError(f"teacher outputs {path} do not exist (write them with python -m "
                     f"t5xlike.infer ... INFER_OUTPUT_DIR=DIR: DIR/<task>-<step>.jsonl)")
  rows = []
  for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    row = json.loads(line)
    missing = [k for k in ("inputs", "targets", "prediction") if not isinstance(row.get(k), str)]
    if missing:
      raise ValueError(f"{path}:{number}: a teacher output row needs the text fields "
                       f"{missing} (task-based `infer --mode=predict` writes them)")
    rows.append({k: row[k] for k in ("inputs", "targets", "prediction")})
  if not rows:
    raise ValueError(f"teacher outputs {path} hold no row")
  return tuple(rows)


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, path: str,
                field: str, prefix: str) -> tf.data.Dataset:
  del shuffle_files, seed  # One file, in its order.
  rows = [r for r in read_outputs(path) if _split_of(r["inputs"]) == split]
  return tf.data.Dataset.from_tensor_slices({"inputs": [prefix + r["inputs"] for r in rows],
                                             "targets": [r[field] for r in rows]})


def _register(name: str, path: str, field: str, prefix: str) -> None:
  if name in seqio.TaskRegistry.names():
    return
  vocabulary = embedded.vocabulary()
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(
          functools.partial(_dataset_fn, path=path, field=field, prefix=prefix), splits=SPLITS),
      preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim],
      output_features={k: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)
                       for k in ("inputs", "targets")},
      postprocess_fn=multitask.strip, metric_fns=[])


def step_by_step(teacher_outputs: str, name: str = "step_by_step",
                 rationale_weight: float = 1.0, prefixes: bool = True) -> str:
  """Registers `<name>_label`, `<name>_teacher` and their mixture `<name>`; returns `name`.

  Args:
    teacher_outputs: an `infer` output JSONL file (inputs, targets, prediction).
    name: the mixture's name (its tasks add `_label` / `_teacher`).
    rationale_weight: lambda, the teacher task's rate relative to the label task's.
    prefixes: prepend "[label] " / "[rationale] " to the inputs (False: plain
      sequence-level distillation mixed with the gold labels).
  """
  if rationale_weight <= 0:
    raise ValueError(f"rationale_weight must be > 0, got {rationale_weight}")
  path = str(pathlib.Path(teacher_outputs).resolve())
  read_outputs(path)  # A missing or malformed file is reported here, by name.
  label, teacher = f"{name}_label", f"{name}_teacher"
  _register(label, path, "targets", LABEL_PREFIX if prefixes else "")
  _register(teacher, path, "prediction", RATIONALE_PREFIX if prefixes else "")
  if name not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(name, [(label, 1.0), (teacher, float(rationale_weight))])
  return name

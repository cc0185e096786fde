"""The expected form of every T5X-style macro, checked as soon as the gin files are parsed.

A macro bound to a value of the wrong form (`--gin.TASK_FEATURE_LENGTHS=64`,
`--gin.TRAIN_STEPS=1e3`, `--gin.MESH_SHAPE=4`) is a `ConfigError` naming the
macro, what it should be and an example, before anything is read or compiled
(not a Python error from deep inside the run). Macros bound to a gin reference
(`@...`) and macros this table does not know are not checked here.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import gin

from t5xlike import library_compat
from t5xlike.errors import ConfigError

#: A check returns None when the value has the form, else what the form is.
Check = Callable[[object], str | None]


def _int(minimum: int, optional: bool = False) -> Check:
  def check(value: object) -> str | None:
    if optional and value is None:
      return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      return f"an integer >= {minimum}{' or None' if optional else ''}"
    return None
  return check


def _string(optional: bool = False) -> Check:
  def check(value: object) -> str | None:
    if optional and value is None:
      return None
    if not isinstance(value, str) or not value:
      return f"a non-empty string{' or None' if optional else ''}"
    return None
  return check


def _bool(value: object) -> str | None:
  return None if isinstance(value, bool) else "True or False"


def _number(value: object) -> str | None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
  return None if ok else "a number >= 0"


def _lengths(value: object) -> str | None:
  ok = isinstance(value, Mapping) and value and all(
      isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
      for k, v in value.items())
  return None if ok else ("a dict from feature name to a positive length, e.g. "
                          "{'inputs': 512, 'targets': 114}")


def _mesh(value: object) -> str | None:
  ok = value is None or isinstance(value, Mapping) and all(
      isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
      and (v >= 1 or v == -1) for k, v in value.items())
  return None if ok else ("a dict from mesh axis to size (-1: the remaining devices) or None, "
                          "e.g. {'data': 2, 'fsdp': -1}")


def _one_of(*choices: str) -> Check:
  def check(value: object) -> str | None:
    return None if value in choices else f"one of {', '.join(repr(c) for c in choices)}"
  return check


def _rules(value: object) -> str | None:
  ok = isinstance(value, str) and value or isinstance(value, (list, tuple))
  return None if ok else ("a preset name ('data_fsdp_tensor', 'fsdp', 'data_parallel') or a "
                          "list of (logical axis, mesh axes) rules")


#: Macro name -> its check. The forms are the T5X macros' and this project's (see
#: docs/architecture.md, "Contracts users rely on").
MACROS: dict[str, Check] = {
    "MODEL_DIR": _string(optional=True),
    "TRAIN_STEPS": _int(1),
    "BATCH_SIZE": _int(1),
    "MIXTURE_OR_TASK_NAME": _string(optional=True),
    "EVAL_MIXTURE_OR_TASK_NAME": _string(optional=True),
    "MIXTURE_OR_TASK_MODULE": _string(optional=True),
    "TASK_FEATURE_LENGTHS": _lengths,
    "INITIAL_CHECKPOINT_PATH": _string(optional=True),
    "CHECKPOINT_PATH": _string(optional=True),
    "RANDOM_SEED": _int(0),
    "DROPOUT_RATE": _number,
    "USE_CACHED_TASKS": _bool,
    "TASK_CACHE_DIR": _string(optional=True),
    "EVAL_OUTPUT_DIR": _string(optional=True),
    "INFER_OUTPUT_DIR": _string(optional=True),
    "MESH_SHAPE": _mesh,
    "DCN_MESH_SHAPE": _mesh,
    "LOGICAL_AXIS_RULES": _rules,
    "ACTIVATION_DTYPE": _one_of("float32", "bfloat16", "float16"),
    "LOG_PERIOD": _int(1),
    "EVAL_PERIOD": _int(1, optional=True),
    "CHECKPOINT_PERIOD": _int(1),
    "EVAL_STEPS": _int(1),
    "EVAL_MAX_EXAMPLES": _int(1, optional=True),
    "NAN_POLICY": _one_of("stop", "skip"),
    "NAN_ROLLBACK_AFTER": _int(1, optional=True),
    "RESTORE_STRICT": _bool,
    "REFERENCE_CHECKPOINT_PATH": _string(optional=True),
    "TEACHER_CHECKPOINT_PATH": _string(optional=True),
}


def check_macros() -> None:
  """Checks every bound macro of `MACROS` (after the gin files and overrides are parsed);
  ConfigError naming the first macro whose value has the wrong form."""
  for name in sorted(library_compat.gin_defined_macros() & set(MACROS)):
    value = gin.query_parameter(f"%{name}")
    if isinstance(value, gin.config.ConfigurableReference):
      continue  # `@...`: built by gin; its own arguments are checked where it is built.
    expected = MACROS[name](value)
    if expected is not None:
      raise ConfigError(f"{name}={value!r}: expected {expected} (--gin.{name}=...)")

"""The operative gin config as flat parameters: a tracker's "config" of the run.

`flat(text)` parses the text `gin.operative_config_str()` returns (MODEL_DIR/config.gin)
into {binding: value}: a macro by its name (`TRAIN_STEPS`), a binding as
`[scope/]module.Configurable.parameter`. Literals keep their Python value (int, float,
str, bool, None, lists, dicts); a reference or a macro inside a value is written as in
gin (`@optim.adafactor`, `%MODEL_DIR`), the whole value then as its gin text.
"""
from __future__ import annotations

from typing import Any

from gin import config_parser


class _GinName:
  """A configurable reference or macro, kept as the text gin writes for it."""

  def __init__(self, text: str):
    self.text = text

  def __repr__(self) -> str:
    return self.text


class _Names(config_parser.ParserDelegate):
  """Parses references and macros to their gin text instead of resolving them."""

  def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> _GinName:
    return _GinName(f"@{scoped_configurable_name}{'()' if evaluate else ''}")

  def macro(self, macro_name: str) -> _GinName:
    return _GinName(f"%{macro_name}")


def _holds_name(value: Any) -> bool:
  if isinstance(value, _GinName):
    return True
  if isinstance(value, dict):
    return any(_holds_name(k) or _holds_name(v) for k, v in value.items())
  if isinstance(value, (list, tuple)):
    return any(_holds_name(v) for v in value)
  return False


def flat(text: str) -> dict[str, Any]:
  """{binding: value} of a gin config's text (module docstring), in file order."""
  params: dict[str, Any] = {}
  for statement in config_parser.ConfigParser(text, _Names()):
    if not isinstance(statement, config_parser.BindingStatement):
      continue  # imports, includes
    name = ".".join(part for part in (statement.selector, statement.arg_name) if part)
    if statement.scope:
      name = f"{statement.scope}/{name}"
    value = statement.value
    params[name] = repr(value) if _holds_name(value) else value
  return params

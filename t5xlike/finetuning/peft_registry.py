"""PEFT methods by the name a PEFT checkpoint records, and that record (`peft.json`'s `method`).

Each method class registers itself under its class name with the class
decorator `@peft_registry.register` (above `@dataclasses.dataclass`):
`lora.LoRA` as 'LoRA', `adapters.Adapters` as 'Adapters',
`prompt_tuning.PromptTuning` as 'PromptTuning'. A method's record is
`{"method": name, field: value, ...}` (its dataclass fields, tuples as
lists; `method_to_json`), and `method_from_json` rebuilds the method from
it. A field added to a method after records were written takes, when a
record lacks it, the value of the class's `record_defaults` (the behaviour
those records were trained with) before the dataclass default: e.g.
`Adapters` records without `placement` load as 'before_dropout'.
`peft_checkpoint` reads and writes records through this module and imports
no method.

The methods are registered when `t5xlike.finetuning` is imported, which
Python does before any of its modules (`peft_checkpoint` included): the
package's `__init__` imports every technique.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol, TypeVar

from t5xlike import interfaces


class Method(interfaces.FineTuningTechnique, Protocol):
  """A registered PEFT method, as the registry and the PEFT checkpoints use it.

  The methods are `peft.PeftMethod` dataclasses; `peft` imports this module,
  so the type is spelled here as a protocol.
  """

  #: Regex over parameter paths selecting the technique's own parameters.
  param_pattern: ClassVar[str]
  #: {field: value} for records written before the field existed (`method_from_json`).
  record_defaults: ClassVar[dict[str, Any]]

  def wrap(self, model: Any) -> Any:
    """`model` carrying the technique's parameters (`peft.wrap_model`)."""
    ...


MethodType = TypeVar("MethodType", bound=Method)

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[MethodType]) -> type[MethodType]:
  """Class decorator: registers a PEFT method class (a dataclass) under `cls.__name__`.

  ValueError when another class already holds the name (a class defined
  again under the same module and name, e.g. on reload, replaces it).
  """
  held = _METHODS.get(cls.__name__)
  if held is not None and (held.__module__, held.__qualname__) != (cls.__module__,
                                                                     cls.__qualname__):
    raise ValueError(f"PEFT method name {cls.__name__!r} is taken by "
                     f"{held.__module__}.{held.__qualname__}")
  _METHODS[cls.__name__] = cls
  return cls


def method_classes() -> dict[str, type[Method]]:
  """{registered name: method class}, a copy."""
  return dict(_METHODS)


def method_class(name: str) -> type[Method]:
  """The method class registered under `name`; ValueError naming the known ones."""
  if name not in _METHODS:
    raise ValueError(f"unknown PEFT method {name!r}; known: {sorted(_METHODS)}")
  return _METHODS[name]


def method_to_json(method: Method) -> dict[str, Any]:
  """{'method': class name, field: value...}: what a PEFT checkpoint records of `method`."""
  if not dataclasses.is_dataclass(method):
    raise TypeError(f"{type(method).__name__} is not a dataclass: a PEFT method's record is "
                    f"its dataclass fields")
  fields = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
  return {"method": type(method).__name__,
          **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def method_from_json(spec: dict[str, Any]) -> Method:
  """The method a PEFT checkpoint's `method` record describes (`method_to_json`'s inverse;
  fields the record lacks take the class's `record_defaults`, then its defaults)."""
  spec = dict(spec)
  cls = method_class(spec.pop("method", None))
  return cls(**{**cls.record_defaults, **spec})

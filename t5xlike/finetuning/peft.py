"""Parameter-efficient fine-tuning (PEFT): the model wrapper and the techniques' base class.

A PEFT technique (`lora.LoRA`, `adapters.Adapters`, `prompt_tuning.PromptTuning`)
adds a few parameters to a network and trains only those. He et al. 2022
("Towards a Unified View of Parameter-Efficient Transfer Learning") read all
three as modifications of hidden states: LoRA adds `s * B A x` to a
projection's output, an adapter adds `f(h W_down) W_up` to a sub-layer's
output, prompt tuning prepends learnt vectors that every layer attends to.

The networks are not edited: `wrap_model(model, method)` returns a copy of
the model whose `network` runs every `init` / `apply` inside
`flax.linen.intercept_methods(method.interceptor())`. The interceptor sees
each module call of the network (`context.module`, its `path`, the method
name) and may create parameters on that module (`module.param` is allowed
inside a compact method's call), change its inputs or add to its output.
So one mechanism serves T5 (`models/t5.py`) and the decoder-only model
(`models/decoder.py`), scanned and unscanned: inside `nn.scan` (`layers.run_stack`)
the new parameters are stacked on the leading `layers` axis like the
others, with their logical axis names (`nn.with_logical_partitioning`;
`lora_rank`, `adapter`, `prompt_length` are replicated by every rules
preset, as any name without a rule).

The technique is also the run's `FineTuning` (`train_run.train.finetuning`):
every parameter but its own (`param_pattern`) is frozen (bit for bit, no
optimizer state; `also_train` adds groups, e.g. layer norms), `describe`
logs the counts, and `export` writes the PEFT checkpoint
(`peft_checkpoint`: the trained parameters only plus the base
checkpoint's path) after the final step.

Module paths given to targets regexes are '/'-joined with the layer
component spelled `layers` (scanned and unscanned alike, e.g.
'encoder/layers/attention/query'): a target applies to every layer of a stack.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import numpy as np

from t5xlike.finetuning import base, freezing, peft_checkpoint, peft_registry, selection

_LAYER = re.compile(r"/layers_\d+(?=/|$)")


def module_path(module: nn.Module) -> str:
  """'encoder/layers/attention/query': the module's path, layer component spelled `layers`."""
  return _LAYER.sub("/layers", "/".join(str(p) for p in module.path))


def dropout_active(module: nn.Module) -> bool:
  """PEFT dropout runs when the call has a 'dropout' rng (training: the models pass
  one exactly when they are not deterministic)."""
  return module.has_rng("dropout")


class InterceptedNetwork:
  """A network whose `init` and `apply` run under a method interceptor.

  Attributes other than `init` / `apply` (e.g. `config`) are the wrapped
  network's."""

  def __init__(self, network: nn.Module, make_interceptor: Callable[[], Callable]):
    self.network = network
    self._make_interceptor = make_interceptor

  def __getattr__(self, name: str) -> Any:
    if name in ("network", "_make_interceptor"):  # Not set yet (copy, unpickling).
      raise AttributeError(name)
    return getattr(self.network, name)

  def init(self, *args, **kwargs):
    with nn.intercept_methods(self._make_interceptor()):
      return self.network.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(self._make_interceptor()):
      return self.network.apply(*args, **kwargs)


def wrap_model(model: Any, method: PeftMethod | None) -> Any:
  """A shallow copy of `model` (any t5xlike token model) whose network carries
  `method`'s parameters; everything else (loss, decoding, feature converter)
  is the model's own. Gin: `train_run.train.model = @peft.wrap_model()` with
  `peft.wrap_model.model = %MODEL`."""
  if method is None:
    raise ValueError("no PEFT method: bind PEFT_METHOD (use gin_configs/finetune/lora.gin, "
                     "adapters.gin or prompt_tuning.gin)")
  if isinstance(model.network, InterceptedNetwork):
    raise ValueError(f"the model already carries a PEFT method ({model.peft_method!r})")
  wrapped = copy.copy(model)
  wrapped.network = method.wrap_network(model.network)
  wrapped.peft_method = method
  return wrapped


class PeftMethod(base.FineTuning):
  """Base class: trains the parameters matching `param_pattern` (and `also_train`).

  Subclasses are frozen dataclasses with an `also_train` field; they define
  `param_pattern` (a regex over per-layer parameter paths, see `selection`)
  and `interceptor()` (a fresh flax method interceptor for one `init` /
  `apply` call), may define `merge(params)` (fold the technique into the
  base parameters; LoRA: `peft_checkpoint.Merging`), and register themselves
  with `@peft_registry.register`, so that their checkpoints load.

  Not a dataclass itself: a field declared here would come first in every
  subclass's fields (and positional arguments).
  """

  #: Regex selecting the technique's own parameters.
  param_pattern: ClassVar[str] = ""
  #: {field: value} a PEFT checkpoint record lacking the field was written with (a field
  #: added later, whose default differs from the earlier behaviour; `peft_registry`).
  record_defaults: ClassVar[dict[str, Any]] = {}
  #: Regex of parameters the technique adds but does not train, kept in its PEFT
  #: checkpoint (`export_mask`; DSEE's fixed sparse support); "" for none.
  export_pattern: ClassVar[str] = ""
  #: Further parameter groups trained (`selection.GroupSpec`s): a field of every subclass.
  also_train: Sequence[selection.GroupSpec]

  def interceptor(self) -> Callable:
    raise NotImplementedError

  def wrap_network(self, network: nn.Module) -> InterceptedNetwork:
    """The network carrying the technique (default: run under `interceptor()`; a
    technique that transforms the parameters instead, `intrinsic`, overrides it)."""
    return InterceptedNetwork(network, self.interceptor)

  def trained_groups(self) -> list[selection.GroupSpec]:
    return [self.param_pattern, *self.also_train]

  def export_mask(self, params: Any) -> Any:
    """The leaves a PEFT checkpoint holds: the trained ones (`trainable`), and any
    frozen parameter the technique adds (DSEE's sparse support) named by
    `export_pattern`."""
    mask = self.trainable(params)
    if not self.export_pattern:
      return mask
    return selection.union(mask, selection.select(params, [self.export_pattern]))

  def frozen(self, params: Any) -> Any:
    if not any(np.asarray(m).any() for m in jax.tree.leaves(
        selection.select(params, [self.param_pattern]))):
      raise ValueError(f"{self!r} added no parameter to this model (no module matches its "
                       f"targets)")
    trained = selection.select(params, self.trained_groups(), require_match=True)
    return jax.tree.map(np.logical_not, trained)

  def update_scales(self, params):
    return freezing.scales_from_frozen(self.frozen(params))

  def describe(self, params):
    trained = selection.select(params, self.trained_groups())
    count, total = selection.count(params, trained)
    lines = [f"{self!r}: trains {count:,} of {total:,} parameters "
             f"({100.0 * count / max(total, 1):.3f}%), the rest frozen"]
    lines += ["  trained " + line for line in selection.describe(params, trained)
              if not line.endswith(": none")]
    return lines

  def export(self, params, model_dir, step, base_checkpoint):
    return peft_checkpoint.export(self, params, model_dir, step, base_checkpoint)

  def wrap(self, model: Any) -> Any:
    return wrap_model(model, self)

  def to_json(self) -> dict[str, Any]:
    """{'method': class name, field: value...}: what a PEFT checkpoint records
    (`peft_registry.method_to_json`)."""
    return peft_registry.method_to_json(self)


def check_positive(method: Any, *names: str) -> None:
  for name in names:
    if int(getattr(method, name)) <= 0:
      raise ValueError(f"{type(method).__name__}.{name} must be positive, "
                       f"got {getattr(method, name)}")


def as_tuple(method: Any, name: str) -> None:
  """Normalises a list field of a frozen dataclass to a tuple (gin binds lists)."""
  value = getattr(method, name)
  if isinstance(value, (list, tuple)):
    object.__setattr__(method, name, tuple(tuple(v) if isinstance(v, list) else v
                                           for v in value))


"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021,
arXiv:2005.00247: after the MLP only).

The output h [b, l, embed] of every attention module (`layers.MultiHeadAttention`:
T5's encoder attention, self- and cross-attention) and/or MLP block
(`layers.MlpBlock`) whose module path matches `targets` passes, before the
residual addition, through

  adapter(z) = z + f(z W_down + b_down) W_up + b_up

with `adapter_down: [embed, size]` (`embed`, `adapter`), `adapter_down_bias:
[size]`, `adapter_up: [size, embed]` and `adapter_up_bias: [embed]`, beside the
module's sub-modules ('encoder/layers_0/mlp/adapter_down').

The defaults follow Houlsby et al.'s reference code (google-research/adapter-bert
`modeling.py`: `feedforward_adapter` and `transformer_model`; `optimization.py`
trains the collections "adapters", "layer_norm" and "head"):
- placement 'after_dropout': the adapter reads the sub-layer's output after its
  residual dropout, x + adapter(dropout(h)) (adapter-bert: `dropout`, then
  `adapter_fn`, then `layer_norm(... + layer_input)`); 'before_dropout' gives
  x + dropout(adapter(h)), the placement before this change.
- init 'near_identity': W_down and W_up ~ truncated normal with standard
  deviation `init_scale` = 1e-3 (before truncation at 2 standard deviations, as
  TF's `truncated_normal_initializer`), biases 0: the adapter starts close to,
  not exactly at, the identity. 'identity': W_up = b_up = 0 exactly (W_down
  fan-in truncated normal), so the wrapped model starts as the base model bit
  for bit.
- f = GELU (tanh approximation, adapter-bert's `gelu`), size 64
  (`feedforward_adapter(hidden_size=64)`).
- the layer norms train too (`also_train` = `selection.NORM_PATTERN`: every
  `.../*norm/scale`); adapter-bert's new classification head has no counterpart
  in a text-to-text model, whose pretrained output layer stays frozen (add it
  with `also_train`).
Houlsby's layers are BERT's two sub-layers; the same rule (an adapter after
every sub-layer) gives a T5 decoder layer three: after self-attention, after
cross-attention (`encoder_decoder_attention`) and after the MLP. Restrict with
`targets`, e.g. '(/attention|self_attention|mlp)$' without the cross-attention,
or Pfeiffer's 'mlp$' (`PFEIFFER_TARGETS`).

Placement 'after_dropout' needs the sub-layer's output to go straight into a
`flax.linen.Dropout` (T5 and the decoder-only model: `layers.residual_dropout`,
also at rate 0); a target whose output is not is a ValueError.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5xlike.finetuning import peft, peft_registry, selection
from t5xlike.models import layers

#: Houlsby: after every attention module and every MLP block.
HOULSBY_TARGETS = r"(attention|mlp)$"
#: Pfeiffer: after the MLP block only.
PFEIFFER_TARGETS = r"mlp$"
PLACEMENTS = ("after_dropout", "before_dropout")
INITS = ("near_identity", "identity")

fan_in_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


@peft_registry.register
@dataclasses.dataclass(frozen=True)
class Adapters(peft.PeftMethod):
  """Bottleneck adapters after the attention / MLP modules matching `targets`.

  Attributes:
    size: bottleneck width (Houlsby's reference: 64).
    activation: the nonlinearity f (`layers.activation` names: 'gelu', 'relu', ...).
    targets: regex over module paths of attention / MLP modules
      (`HOULSBY_TARGETS`, `PFEIFFER_TARGETS`).
    placement: 'after_dropout' (Houlsby) or 'before_dropout' (see module docstring).
    init: 'near_identity' (Houlsby: both projections N(0, init_scale) truncated) or
      'identity' (W_up = 0).
    init_scale: the standard deviation of 'near_identity'.
    also_train: further parameter groups trained (`selection.GroupSpec`s; default the
      layer norms, as Houlsby).
  """
  size: int = 64
  activation: str = "gelu"
  targets: str = HOULSBY_TARGETS
  also_train: Sequence[selection.GroupSpec] = (selection.NORM_PATTERN,)
  placement: str = "after_dropout"
  init: str = "near_identity"
  init_scale: float = 1e-3

  param_pattern = r"/adapter_(down|up)(_bias)?$"
  #: A record written before `placement` and `init` existed: the adapter then sat
  #: before the dropout and started at the identity.
  record_defaults: ClassVar[dict[str, Any]] = {"placement": "before_dropout",
                                               "init": "identity"}

  def __post_init__(self):
    peft.check_positive(self, "size")
    layers.activation(self.activation)  # Validates the name.
    re.compile(self.targets)
    if self.placement not in PLACEMENTS:
      raise ValueError(f"Adapters.placement must be one of {PLACEMENTS}, got "
                       f"{self.placement!r}")
    if self.init not in INITS:
      raise ValueError(f"Adapters.init must be one of {INITS}, got {self.init!r}")
    peft.as_tuple(self, "also_train")

  def _initializers(self) -> tuple[Callable, Callable]:
    """(W_down's, W_up's) initialisers."""
    if self.init == "identity":
      return fan_in_init, nn.initializers.zeros
    near = nn.initializers.truncated_normal(stddev=self.init_scale)
    return near, near

  def interceptor(self):
    fn = layers.activation(self.activation)
    down_init, up_init = self._initializers()
    # Adapters waiting for their sub-layer's dropout: (that sub-layer's output, the
    # adapter as a function, the sub-layer's path).
    pending: list[tuple[jax.Array, Callable[[jax.Array], jax.Array], str]] = []

    def adapter(module: nn.Module, features: int) -> Callable[[jax.Array], jax.Array]:
      """The module's adapter parameters (created on it) as z -> adapter(z); z: [..,
      features]."""
      dtype = module.dtype
      param = lambda name, init, shape, axes: layers.logical_param(
          module, name, init, axes, shape, jnp.float32).astype(dtype)
      down = param("adapter_down", down_init, (features, self.size), ("embed", "adapter"))
      down_bias = param("adapter_down_bias", nn.initializers.zeros, (self.size,), ("adapter",))
      up = param("adapter_up", up_init, (self.size, features), ("adapter", "embed"))
      up_bias = param("adapter_up_bias", nn.initializers.zeros, (features,), ("embed",))
      return lambda z: z + (jnp.dot(fn(jnp.dot(z.astype(dtype), down) + down_bias), up)
                            + up_bias).astype(z.dtype)

    def intercept(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != "__call__":
        out = next_fun(*args, **kwargs)
      elif (isinstance(module, (layers.MultiHeadAttention, layers.MlpBlock))
            and re.search(self.targets, peft.module_path(module))):
        out = next_fun(*args, **kwargs)
        apply = adapter(module, out.shape[-1])
        if self.placement == "before_dropout":
          out = apply(out)
        else:
          pending.append((out, apply, peft.module_path(module)))
      elif isinstance(module, nn.Dropout) and pending:
        x = args[0] if args else kwargs["inputs"]
        waiting = next((i for i, (h, _, _) in enumerate(pending) if h is x), None)
        out = next_fun(*args, **kwargs)
        if waiting is not None:
          out = pending.pop(waiting)[1](out)
      else:
        out = next_fun(*args, **kwargs)
      if pending and not module.path:  # A call of the whole network ends.
        raise ValueError(f"Adapters(placement='after_dropout'): the output of "
                         f"{pending[0][2]} does not go into a dropout module (use "
                         f"placement='before_dropout')")
      return out
    return intercept


"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021,
arXiv:2005.00247: after the MLP only).

The output h [b, l, embed] of every attention module (`layers.MultiHeadAttention`:
T5's encoder attention, self- and cross-attention) and/or MLP block
(`layers.MlpBlock`) whose module path matches `targets` becomes, before the
residual addition,

  h + f(h W_down + b_down) W_up + b_up

with `adapter_down: [embed, size]` (`embed`, `adapter`; fan-in normal init),
`adapter_down_bias: [size]`, `adapter_up: [size, embed]` and
`adapter_up_bias: [embed]`, the up-projection and its bias initialised to
zero, so the wrapped model starts as the base model exactly. They sit
beside the module's sub-modules ('encoder/layers_0/mlp/adapter_down').
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from t5xlike.finetuning import peft, peft_registry, selection
from t5xlike.models import layers

#: Houlsby: after every attention module and every MLP block.
HOULSBY_TARGETS = r"(attention|mlp)$"
#: Pfeiffer: after the MLP block only.
PFEIFFER_TARGETS = r"mlp$"

down_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


@peft_registry.register
@dataclasses.dataclass(frozen=True)
class Adapters(peft.PeftMethod):
  """Bottleneck adapters after the attention / MLP modules matching `targets`.

  Attributes:
    size: bottleneck width.
    activation: the nonlinearity f (`layers.activation` names: 'relu', 'gelu', ...).
    targets: regex over module paths of attention / MLP modules
      (`HOULSBY_TARGETS`, `PFEIFFER_TARGETS`).
    also_train: further parameter groups trained (`selection.GroupSpec`s).
  """
  size: int = 32
  activation: str = "relu"
  targets: str = HOULSBY_TARGETS
  also_train: Sequence[selection.GroupSpec] = ()

  param_pattern = r"/adapter_(down|up)(_bias)?$"

  def __post_init__(self):
    peft.check_positive(self, "size")
    layers.activation(self.activation)  # Validates the name.
    re.compile(self.targets)
    peft.as_tuple(self, "also_train")

  def interceptor(self):
    fn = layers.activation(self.activation)

    def intercept(next_fun, args, kwargs, context):
      module = context.module
      if (context.method_name != "__call__"
          or not isinstance(module, (layers.MultiHeadAttention, layers.MlpBlock))
          or not re.search(self.targets, peft.module_path(module))):
        return next_fun(*args, **kwargs)
      h = next_fun(*args, **kwargs)
      features, dtype = h.shape[-1], module.dtype
      param = lambda name, init, shape, axes: layers.logical_param(
          module, name, init, axes, shape, jnp.float32).astype(dtype)
      down = param("adapter_down", down_init, (features, self.size), ("embed", "adapter"))
      down_bias = param("adapter_down_bias", nn.initializers.zeros, (self.size,), ("adapter",))
      up = param("adapter_up", nn.initializers.zeros, (self.size, features), ("adapter", "embed"))
      up_bias = param("adapter_up_bias", nn.initializers.zeros, (features,), ("embed",))
      hidden = fn(jnp.dot(h.astype(dtype), down) + down_bias)
      return h + (jnp.dot(hidden, up) + up_bias).astype(h.dtype)
    return intercept

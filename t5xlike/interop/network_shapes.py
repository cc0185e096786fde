"""The parameter shapes a t5xlike network wants, from `jax.eval_shape` (nothing allocated)."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from t5xlike import checkpoints
from t5xlike.models import decoder, encoder_decoder, t5


def model_for(network_config: Any, vocabulary: Any = None) -> Any:
  """The t5xlike model (network + loss) of a `t5.T5Config` or `decoder.DecoderConfig`."""
  if isinstance(network_config, t5.T5Config):
    return encoder_decoder.EncoderDecoderModel(t5.Transformer(network_config), vocabulary)
  if isinstance(network_config, decoder.DecoderConfig):
    return decoder.DecoderOnlyModel(decoder.Transformer(network_config), vocabulary)
  raise TypeError(f"no converter for network config {type(network_config).__name__}")


def param_shapes(network_config: Any) -> dict[str, tuple[int, ...]]:
  """{'encoder/layers_0/mlp/wo/kernel': shape} of the network's float32 parameters."""
  model = model_for(network_config)
  names = model.feature_names
  batch = {name: jax.ShapeDtypeStruct((1, 4), np.int32) for name in names}
  boxed = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
  return checkpoints.flat_shapes(boxed)

"""LoRA: low-rank adaptation of chosen projections (Hu et al. 2021, arXiv:2106.09685).

Every `layers.Dense` whose module path (`peft.module_path`, e.g.
'encoder/layers/attention/query') matches `targets` computes

  y = x W + (alpha / rank) * dropout(x) A B

with `A: [in, rank]` (`lora_a`, logical axes (the kernel's input axis,
`lora_rank`), Kaiming-uniform as in the reference implementation: U(-b, b),
b = 1/sqrt(in)) and `B: [rank, out]` (`lora_b`, (`lora_rank`, the kernel's
output axis)) initialised to zero, so the wrapped model starts as the base
model exactly. Both sit beside the frozen kernel
('encoder/layers_0/attention/query/{kernel,lora_a,lora_b}'; scanned: a
leading `layers` axis). Dropout (rate `dropout`) acts on the LoRA branch's
input only, in training.

Defaults are HF peft's (`LoraConfig`: r = 8, lora_alpha = 8, lora_dropout = 0.0,
`src/peft/tuners/lora/config.py`; T5's default targets there are q and v, as here),
so that a rank / alpha / learning rate tuned with peft transfers: the scale
alpha / rank is 1. (Hu et al.'s microsoft/LoRA `loralib.Linear` has no usable
default: r = 0, i.e. no LoRA, and lora_alpha = 1.)

`merge(params)` folds the update into the kernels, `W + (alpha / rank) A B`
(float32), and drops `lora_a` / `lora_b`: the base architecture's
parameters, for the plain model gin (`MODEL_DIR/merged/checkpoint_<N>`).

`export` also writes Hugging Face PEFT's adapter files into the PEFT checkpoint
(`MODEL_DIR/peft/checkpoint_<N>/adapter_config.json` and
`adapter_model.safetensors`, `interop/hf_peft.py`) for T5 and Llama-style
networks: `peft.PeftModel.from_pretrained(hf_base, that directory)` loads them onto
the base checkpoint's Hugging Face export (`python -m t5xlike.convert --from=t5xlike
--to=hf`). Adapters trained with peft come back with `--from=peft`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5xlike import checkpoints, partitioning
from t5xlike.finetuning import peft, peft_registry, selection
from t5xlike.interop import hf_peft, param_trees
from t5xlike.models import layers

log = logging.getLogger(__name__)

#: Attention query and value projections of every attention module (Hu et al. §7.1).
DEFAULT_TARGETS = r"attention/(query|value)$"

a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@peft_registry.register
@dataclasses.dataclass(frozen=True)
class LoRA(peft.PeftMethod):
  """LoRA on the dense layers matching `targets` (see module docstring).

  Attributes:
    rank: r, the inner size of A B (peft's default 8).
    alpha: the update is scaled by alpha / rank (peft's default 8: scale 1).
    dropout: dropout rate on the LoRA input (training only).
    targets: regex searched in module paths ('.../attention/query').
    also_train: further parameter groups trained (`selection.GroupSpec`s).
  """
  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS
  also_train: Sequence[selection.GroupSpec] = ()

  param_pattern = r"/lora_[ab]$"

  def __post_init__(self):
    peft.check_positive(self, "rank")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA.dropout must be in [0, 1), got {self.dropout}")
    re.compile(self.targets)
    peft.as_tuple(self, "also_train")

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)

  def interceptor(self):
    def intercept(next_fun, args, kwargs, context):
      module = context.module
      if (context.method_name != "__call__" or not isinstance(module, layers.Dense)
          or not re.search(self.targets, peft.module_path(module))):
        return next_fun(*args, **kwargs)
      y = next_fun(*args, **kwargs)
      x = args[0] if args else kwargs["x"]
      in_axis, out_axis = module.kernel_axes
      a = layers.logical_param(module, "lora_a", a_init, (in_axis, "lora_rank"),
                               (x.shape[-1], self.rank), jnp.float32)
      b = layers.logical_param(module, "lora_b", nn.initializers.zeros, ("lora_rank", out_axis),
                               (self.rank, module.features), jnp.float32)
      if self.dropout > 0.0 and peft.dropout_active(module):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - self.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
      dtype = module.dtype
      update = jnp.dot(jnp.dot(x.astype(dtype), a.astype(dtype)), b.astype(dtype))
      return y + (jnp.asarray(self.scale, dtype) * update).astype(y.dtype)
    return intercept

  def export(self, params, model_dir, step, base_checkpoint):
    """The PEFT checkpoint and the merged one (`peft.PeftMethod.export`), plus the
    Hugging Face PEFT adapter files in the PEFT checkpoint (`write_hf_adapter`)."""
    written = super().export(params, model_dir, step, base_checkpoint)
    self.write_hf_adapter(params, written[0], base_checkpoint)
    return written

  def write_hf_adapter(self, params: Any, directory: Any, base_checkpoint: str | None) -> None:
    """Writes `adapter_config.json` + `adapter_model.safetensors` (`hf_peft.write`) into
    `directory` on process 0 (every process gathers the LoRA arrays); a network without
    a Hugging Face equivalent is logged and skipped, and so is a run that also trains
    base parameters (`also_train`: PEFT's adapter would lack them). `base_model_name_or_path`
    is the root of the base checkpoint's chain (`checkpoints.checkpoint_chain`), absolute:
    a t5xlike checkpoint, not a Hugging Face directory (`PeftModel.from_pretrained(base, dir)`
    takes the base model given; `AutoPeftModel` cannot load it)."""
    if self.also_train:
      if jax.process_index() == 0:
        log.info("no Hugging Face PEFT adapter written: also_train trains base parameters "
                 "too, which adapter_model.safetensors would not hold (the PEFT checkpoint "
                 "and merged/ have them)")
      return
    flat = param_trees.flatten(params)
    lora = {name: partitioning.host_array(value) for name, value in flat.items()
            if re.search(self.param_pattern, name)}
    shapes = param_trees.unstacked_shapes({name: np.shape(v) for name, v in flat.items()})
    if param_trees.is_scanned(flat):
      lora = param_trees.unstack(lora)
    if jax.process_index() != 0:
      return
    base = None
    if base_checkpoint:
      try:
        base = str(checkpoints.checkpoint_chain(base_checkpoint)[-1])
      except ValueError:  # Gone since the run started: recorded as given.
        base = str(base_checkpoint)
      base = base if "://" in base else os.path.abspath(base)
    try:
      hf_peft.write(directory, lora, shapes, self.rank, self.alpha, self.dropout, base)
    except ValueError as error:
      log.info("no Hugging Face PEFT adapter written: %s", error)
      return
    log.info("Hugging Face PEFT adapter: %s/%s", directory, hf_peft.ADAPTER_CONFIG)

  def merge(self, params: Any) -> Any:
    """Base-architecture parameters: every `{kernel, lora_a, lora_b}` module becomes
    `{kernel: kernel + scale * lora_a @ lora_b}` (scanned leaves layer by layer)."""
    return merge_lora(params, self.scale)


def merge_lora(params: Any, scale: float) -> Any:
  """Folds LoRA into the kernels: W + scale * A B, float32; `lora_a` / `lora_b` removed.

  `params` is a nested dict of arrays (unboxed); a module dict holding
  `lora_a` [.., in, r] and `lora_b` [.., r, out] must hold `kernel` [.., in, out]
  (leading axes: a scanned stack's layers)."""
  if not isinstance(params, dict):
    return params
  if "lora_a" in params or "lora_b" in params:
    out = {k: v for k, v in params.items() if k not in ("lora_a", "lora_b")}
    delta = jnp.matmul(jnp.asarray(params["lora_a"], jnp.float32),
                       jnp.asarray(params["lora_b"], jnp.float32))
    kernel = params["kernel"]
    out["kernel"] = (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)
    return out
  return {k: merge_lora(v, scale) for k, v in params.items()}

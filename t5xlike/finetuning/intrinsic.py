"""Intrinsic-dimension fine-tuning (Aghajanyan, Zettlemoyer & Gupta 2021, "Intrinsic
Dimensionality Explains the Effectiveness of Language Model Fine-Tuning",
arXiv:2012.13255, Section 3; after Li et al. 2018).

Only a d-dimensional vector trains; the model's parameters are a fixed random
projection of it away from the pretrained ones:

  DID  (direct intrinsic dimension):  θ_D = θ_0 + P θ_d
  SAID (structure-aware, the paper's Section 3): θ_D^i = θ_0^i + λ_i (P θ_{d-m})_i

θ_0 [D] the pretrained parameters (those matching `targets`, default all, in
sorted path order, concatenated; frozen), P: R^d -> R^D one Fastfood transform
(`fastfood`: H G Π H B, scaled so that E[P^T P] = I), (·)_i the slice of the i-th
of the m projected parameter tensors, λ [m] one scale per tensor (SAID: d - m
entries of θ plus the m scales, d in all). θ starts at 0 and λ at 1, so the model
starts as the pretrained one exactly. P is regenerated from `seed` in every run and
never stored: the PEFT checkpoint holds θ (`intrinsic/theta`) and λ
(`intrinsic/lambda`), its `peft.json` the dimension and the seed.

The network is not intercepted: `wrap_network` returns a `ProjectedNetwork`
whose `init` adds the 'intrinsic' parameters and whose `apply` computes θ_D and
runs the plain network on it. A scanned stack's leaf ([layers, ...]) is one tensor
(one λ). `merge(params)` writes θ_D as a plain checkpoint of the base
architecture.
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5xlike.finetuning import fastfood, peft, peft_registry, selection

OWN = "intrinsic"


def _flat(params: Any) -> dict[str, Any]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(
      dict(params), is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned)).items()}


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


class ProjectedNetwork(peft.InterceptedNetwork):
  """A network whose parameters are θ_0 + P θ (`IntrinsicDimension.project`): `init`
  adds the 'intrinsic' parameters, `apply` projects before running the network."""

  def __init__(self, network: nn.Module, method: IntrinsicDimension):
    super().__init__(network, lambda: lambda next_fun, args, kwargs, context: next_fun(
        *args, **kwargs))
    self.method = method

  def init(self, *args, **kwargs):
    variables = dict(self.network.init(*args, **kwargs))
    if "params" in variables:
      params = dict(variables["params"])
      sizes = self.method.sizes(nn.meta.unbox(params))
      params[OWN] = {name: nn.LogicallyPartitioned(value, ("intrinsic_dim",))
                     for name, value in self.method.initial(len(sizes)).items()}
      variables["params"] = params
    return variables

  def apply(self, variables, *args, **kwargs):
    variables = dict(variables)
    params = dict(variables["params"])
    own = params.pop(OWN)
    variables["params"] = self.method.project(params, own)
    return self.network.apply(variables, *args, **kwargs)


@peft_registry.register
@dataclasses.dataclass(frozen=True)
class IntrinsicDimension(peft.PeftMethod):
  """Trains d numbers projected into the parameters (module docstring).

  Attributes:
    dimension: d, the trained numbers (SAID: d - m of θ plus m scales λ).
    said: True: SAID (a scale per projected tensor); False: DID.
    seed: regenerates the Fastfood projection P.
    targets: regex over parameter paths ('encoder/layers_0/mlp/wi_0/kernel') of the
      projected parameters (default: all).
    also_train: further parameter groups trained directly (`selection.GroupSpec`s).
  """
  dimension: int = 1000
  said: bool = True
  seed: int = 0
  targets: str = "."
  also_train: Sequence[selection.GroupSpec] = ()

  param_pattern = rf"^{OWN}/(theta|lambda)$"
  #: The backward pass computes the gradient of every projected weight (then P^T of it):
  #: `flops` counts it as full fine-tuning's.
  differentiates_all_weights: ClassVar[bool] = True

  def __post_init__(self):
    peft.check_positive(self, "dimension")
    re.compile(self.targets)
    peft.as_tuple(self, "also_train")

  def wrap_network(self, network: nn.Module) -> ProjectedNetwork:
    return ProjectedNetwork(network, self)

  def interceptor(self):  # (not used: `wrap_network` projects the parameters)
    return lambda next_fun, args, kwargs, context: next_fun(*args, **kwargs)

  def sizes(self, base: Any) -> dict[str, int]:
    """{path: entries} of the projected parameters of a base tree (sorted by path)."""
    flat = _flat(base)
    out = {path: int(np.prod(np.shape(v))) for path, v in sorted(flat.items())
           if not path.startswith(f"{OWN}/") and re.search(self.targets, path)}
    if not out:
      raise ValueError(f"IntrinsicDimension(targets={self.targets!r}) matches no parameter")
    return out

  def theta_size(self, tensors: int) -> int:
    """The entries of θ: d, or d - m with SAID's m scales."""
    size = self.dimension - (tensors if self.said else 0)
    if size <= 0:
      raise ValueError(f"IntrinsicDimension: dimension={self.dimension} leaves no entry of "
                       f"theta beside SAID's {tensors} scales (one per projected tensor)")
    return size

  def initial(self, tensors: int) -> dict[str, jax.Array]:
    """{'theta': zeros [d or d - m], 'lambda': ones [m] (SAID only)}: θ_D = θ_0."""
    out = {"theta": jnp.zeros((self.theta_size(tensors),), jnp.float32)}
    if self.said:
      out["lambda"] = jnp.ones((tensors,), jnp.float32)
    return out

  def projection(self, sizes: dict[str, int]) -> fastfood.FastfoodVars:
    """P's random parts for these projected tensors (regenerated from the seed, the
    dimensions and the tensors' paths)."""
    total = sum(sizes.values())
    signature = zlib.crc32("\n".join(f"{p}:{n}" for p, n in sizes.items()).encode())
    return fastfood.fastfood_vars(self.theta_size(len(sizes)), total, (self.seed, signature))

  def project(self, base: Any, own: Any) -> Any:
    """θ_0 + (λ_i) P θ: the base tree (unboxed, without 'intrinsic') with every
    projected leaf moved, in its dtype."""
    flat = _flat(base)
    sizes = self.sizes(base)
    ray = fastfood.project(jnp.asarray(own["theta"]), self.projection(sizes))
    offset = 0
    for index, (path, size) in enumerate(sizes.items()):
      leaf = flat[path]
      part = ray[offset:offset + size].reshape(np.shape(leaf))
      if self.said:
        part = part * own["lambda"][index]
      flat[path] = (leaf.astype(jnp.float32) + part).astype(leaf.dtype)
      offset += size
    return _nested(flat)

  def merge(self, params: Any) -> Any:
    """θ_D as the base architecture's parameters (float32; 'intrinsic' dropped)."""
    params = dict(params)
    own = params.pop(OWN)
    return jax.device_get(self.project(params, own))

  def describe(self, params):
    sizes = self.sizes({k: v for k, v in dict(params).items() if k != OWN})
    ff = self.projection(sizes)
    return super().describe(params) + [
        f"  {'SAID' if self.said else 'DID'}: theta [{ff.in_dim}]"
        + (f" and {len(sizes)} per-tensor scales" if self.said else "")
        + f" -> {ff.out_dim:,} parameters of {len(sizes)} tensors by a Fastfood transform "
        f"of length {ff.length:,} (seed {self.seed}, regenerated, not stored)"]

"""SPDF: sparse pre-training, dense fine-tuning (Thangarasa et al. 2023,
"SPDF: Sparse Pre-training and Dense Fine-tuning for Large Language Models",
arXiv 2303.10464).

The paper (abstract, §1) pre-trains GPT models with static unstructured
weight sparsity, up to 75% on GPT-3 XL (1.3B parameters) for 2.5x fewer
pre-training FLOPs, then fine-tunes densely, letting the zeroed weights
learn. Here, as the paper's setup and this project's issue describe it:
at initialisation every weight matrix of the attention and MLP layers gets
a random mask (seeded, uniform over the matrix, exactly round(s * n) of its
n weights removed) and keeps it for the whole run; embeddings, norms and
the output layer stay dense. Sparsity levels studied: 50% and 75%.

The masked weights are exactly 0.0 from initialisation on
(`SparseModel.init`), the optimizer (`keep_sparse`) keeps them 0.0 after
every update and feeds the inner optimizer zero gradients there (so Adam's
moments of a masked weight stay 0.0), and the masks, read off the initial
zeros, live in the optimizer state, hence in every checkpoint.

Dense fine-tuning: the same network, a plain (dense) optimizer,
`INITIAL_CHECKPOINT_PATH` = a sparse run's step directory. The parameters
and step are restored, the masks (optimizer state of another optimizer) are
not: the former zeros learn from there.

Training FLOPs: `train.jsonl` logs `dense_train_flops` and
`sparse_train_flops` per step, both counted by `t5xlike.flops` (its
`Accounting` recognises a `SparseModel`): every matmul of the step, with
the sparsity applied to the masked kernels only. Attention's Q K^T and P V,
and the output layer (tied to the embeddings or not), stay dense, so the
saving is below 1 / (1 - s): 2.49x at 75% on GPT-3 XL shapes, the paper's
~2.5x (a count of the kernels alone would say 3.24x there).
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from t5xlike import interfaces
from t5xlike.inference import decoding

#: Weight matrices that are sparsified: the kernels of attention and MLP blocks.
DEFAULT_INCLUDE = r"(attention|mlp)/[^/]+/kernel$"


def _path_string(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _selected(path, include: str) -> bool:
  return re.search(include, _path_string(path)) is not None


def random_mask(key: jax.Array, shape: tuple[int, ...], sparsity: float) -> jax.Array:
  """bool `shape`: exactly round(sparsity * size) False entries, uniformly placed."""
  size = 1
  for dim in shape:
    size *= dim
  removed = int(round(sparsity * size))
  order = jax.random.permutation(key, size)
  keep = jnp.ones((size,), jnp.bool_).at[order[:removed]].set(False)
  return keep.reshape(shape)


def weight_masks(boxed_params: Any, sparsity: float, seed: int,
                 include: str = DEFAULT_INCLUDE) -> Any:
  """Masks (bool, True = kept) for the selected leaves of boxed parameters, None elsewhere.

  Each matrix's mask is seeded by (seed, its path); a stacked leaf (logical
  axes starting with `layers`, from a scanned stack) gets one mask per layer.
  """
  def mask_of(path, leaf):
    if not _selected(path, include):
      return None
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(_path_string(path).encode()))
    value = nn.meta.unbox(leaf)
    names = (leaf.names or ()) if isinstance(leaf, nn.LogicallyPartitioned) else ()
    if names[:1] == ("layers",):
      keys = jax.random.split(key, value.shape[0])
      return jax.vmap(lambda k: random_mask(k, value.shape[1:], sparsity))(keys)
    return random_mask(key, value.shape, sparsity)

  return jax.tree_util.tree_map_with_path(
      mask_of, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


class SparseModel:
  """Wraps a model so that its attention and MLP matrices start sparse.

  Everything but `init` is the wrapped model's: the
  `interfaces.Model` members, the `interfaces.DecodingModel` ones (for a
  model that decodes; AttributeError on use otherwise) and `exports` (empty
  for a model that exports nothing).

  Args:
    model: any t5xlike model (`init`, `loss_fn`, `metrics`, ...).
    sparsity: fraction of each selected matrix's weights removed (0.5, 0.75).
    seed: seeds the masks (with each matrix's path).
    include: regex over '/'-joined parameter paths selecting the matrices.
  """

  def __init__(self, model: interfaces.Model, sparsity: float = 0.5, seed: int = 0,
               include: str = DEFAULT_INCLUDE):
    if not 0.0 <= sparsity < 1.0:
      raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    self.model = model
    self.sparsity = sparsity
    self.seed = seed
    self.include = include

  # -- the wrapped model's members ----------------------------------------------------------
  @property
  def feature_converter(self) -> str:
    return self.model.feature_converter

  @property
  def vocabulary(self) -> Any:
    return self.model.vocabulary

  @property
  def vocab_size(self) -> int:
    return self.model.vocab_size

  @property
  def network(self) -> Any:
    return self.model.network

  @property
  def peft_method(self) -> interfaces.FineTuningTechnique | None:
    return self.model.peft_method

  @property
  def weight_feature(self) -> str:
    return self._decoding().weight_feature

  def score_batch(self, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The wrapped model's `score_batch` (the masked weights are plain zeros there)."""
    return self._decoding().score_batch(params, batch)

  def predict_batch(self, params: Any, batch: Mapping[str, jax.Array],
                    config: decoding.DecodingConfig, max_length: int, eos_id: int,
                    rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The wrapped model's `predict_batch`.

    Args:
      params: the (sparse) parameters.
      batch: the rows' features.
      config: how each next token is chosen.
      max_length: tokens generated at most per row.
      eos_id: the token that ends a row.
      rng: the key of method 'sample' (None otherwise).
    """
    return self._decoding().predict_batch(params, batch, config, max_length, eos_id, rng=rng)

  def exports(self, params: Any) -> Mapping[str, Any]:
    """The wrapped model's exports (ELECTRA's discriminator); none for the others."""
    if isinstance(self.model, interfaces.ExportingModel):
      return self.model.exports(params)
    return {}

  def _decoding(self) -> interfaces.DecodingModel:
    # A model that does not decode (a classifier) fails at the missing member's use,
    # as it would unwrapped.
    return cast(interfaces.DecodingModel, self.model)

  # -- sparsity -----------------------------------------------------------------------------

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
    """The wrapped model's variables with the masked weights set to exactly 0.0."""
    variables = dict(self.model.init(rng, batch))
    params = variables["params"]
    masks = weight_masks(params, self.sparsity, self.seed, self.include)

    def apply(leaf, mask):
      if mask is None:
        return leaf
      if isinstance(leaf, nn.LogicallyPartitioned):
        return leaf.replace_boxed(jnp.where(mask, leaf.value, 0.0).astype(leaf.value.dtype))
      return jnp.where(mask, leaf, 0.0).astype(leaf.dtype)

    is_leaf = lambda x: isinstance(x, nn.LogicallyPartitioned) or x is None
    variables["params"] = jax.tree.map(apply, params, masks, is_leaf=is_leaf)
    return variables

  def loss_fn(self, params: Any, batch: Mapping[str, jax.Array], dropout_rng: jax.Array | None):
    """The wrapped model's loss (the masked weights are plain zeros there)."""
    return self.model.loss_fn(params, batch, dropout_rng)

  def metrics(self, sums: Mapping[str, Any]) -> dict[str, Any]:
    """The wrapped model's metrics."""
    return self.model.metrics(sums)


class SparsityState(NamedTuple):
  """The masks (bool, True = trainable weight; None for dense leaves)."""
  masks: Any


def _mask_tree(params: Any, include: str) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, p: (p != 0) if _selected(path, include) else None, params)


def keep_sparse(inner: optax.GradientTransformation,
                include: str = DEFAULT_INCLUDE) -> optax.GradientTransformation:
  """Wraps an optimizer so that weights that are 0.0 at init stay exactly 0.0.

  `init(params)` records the masks (`params != 0` on the selected leaves);
  `update` zeroes the gradients of masked weights before `inner` (so its
  per-weight state stays 0.0 there) and makes the update of a masked weight
  `-param`, i.e. the new value is exactly 0.0 whatever `inner` proposes.
  """
  is_none = lambda x: x is None

  def init(params):
    return (SparsityState(_mask_tree(params, include)), inner.init(params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("keep_sparse needs the parameters in update()")
    sparsity, inner_state = state
    masked = lambda g, m: g if m is None else jnp.where(m, g, jnp.zeros_like(g))
    grads = jax.tree.map(lambda m, g: masked(g, m), sparsity.masks, updates, is_leaf=is_none)
    new_updates, inner_state = inner.update(grads, inner_state, params)
    new_updates = jax.tree.map(
        lambda m, u, p: u if m is None else jnp.where(m, u, -p),
        sparsity.masks, new_updates, params, is_leaf=is_none)
    return new_updates, (sparsity, inner_state)

  return optax.GradientTransformation(init, update)


def sparse_optimizer(learning_rate: Any, inner: Any,
                     include: str = DEFAULT_INCLUDE) -> optax.GradientTransformation:
  """Gin-facing factory: `inner(learning_rate=...)` wrapped by `keep_sparse`."""
  return keep_sparse(inner(learning_rate=learning_rate), include)

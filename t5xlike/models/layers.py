"""Transformer layers shared by every model family (Flax linen).

Every parameter is created through `logical_param` (`nn.with_logical_partitioning`),
so it carries logical axis names from the vocabulary shared with
`t5xlike.partitioning`: `vocab`, `embed`, `mlp`, `heads`, `kv`, `joined_kv`,
`relpos_buckets`, `layers`. Activations are tagged with
`nn.with_logical_constraint` (`batch`, `length`, `embed`, `mlp`, `heads`,
`kv`); without axis rules in scope those constraints are no-ops.

Parameter names and shapes follow T5X's `layers.py` (2-D kernels, e.g. a
query kernel is `[embed, heads * kv]`), so T5X checkpoints map one to one.

One `MultiHeadAttention` serves every family: T5's defaults (query scaling
folded into the init, positions from relative biases passed as `bias`), and
opt-in Llama-style features (grouped-query attention, rotary position
embeddings, run-time query scaling) and autoregressive decoding with a KV
cache. `run_stack` applies a stack of layers as a loop or one `nn.scan`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from t5xlike.models import attention, masks, rope

Array = jax.Array
Initializer = Callable[..., Array]

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
attention_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
embedding_init = nn.initializers.normal(stddev=1.0)
relpos_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

# Large negative number used to mask attention logits (as in T5X).
NEG_INF = -1e10

#: Names of the activations tagged with `checkpoint_name`, for remat policies.
ACTIVATION_NAMES = ("query_proj", "key_proj", "value_proj", "attention_out", "mlp_hidden",
                    "mlp_out")
#: Sentinel returned by `remat_policy('none')`: no rematerialisation at all.
NO_REMAT = object()


def remat_policy(policy: str | Sequence[str]):
  """A JAX checkpoint policy from its name.

  'none' -> NO_REMAT (keep every activation); 'full' -> save nothing,
  recompute the layer in the backward pass; 'dots_saveable' -> keep matmul
  outputs; a list of names from ACTIVATION_NAMES -> keep exactly those.
  """
  if isinstance(policy, str):
    named = {"none": NO_REMAT, "full": jax.checkpoint_policies.nothing_saveable,
             "dots_saveable": jax.checkpoint_policies.dots_saveable}
    if policy not in named:
      raise ValueError(f"unknown remat policy {policy!r}: use one of {sorted(named)} or a "
                       f"list of activation names from {ACTIVATION_NAMES}")
    return named[policy]
  unknown = set(policy) - set(ACTIVATION_NAMES)
  if unknown:
    raise ValueError(f"unknown activation names {sorted(unknown)} in remat policy; "
                     f"known: {ACTIVATION_NAMES}")
  return jax.checkpoint_policies.save_only_these_names(*policy)

def check_network_config(cfg, positive: Sequence[str]) -> None:
  """Validates and normalises a frozen network-config dataclass in `__post_init__`.

  Checks that the fields named in `positive` are > 0 and `dropout_rate` is in
  [0, 1); turns `mlp_activations` and a list `remat_policy` into tuples (so
  the config hashes) and validates the remat policy's name.
  """
  kind = type(cfg).__name__
  for name in positive:
    if int(getattr(cfg, name)) <= 0:
      raise ValueError(f"{kind}.{name} must be positive, got {getattr(cfg, name)}")
  if not 0.0 <= cfg.dropout_rate < 1.0:
    raise ValueError(f"{kind}.dropout_rate must be in [0, 1), got {cfg.dropout_rate}")
  object.__setattr__(cfg, "mlp_activations", tuple(cfg.mlp_activations))
  if not isinstance(cfg.remat_policy, str):
    object.__setattr__(cfg, "remat_policy", tuple(cfg.remat_policy))
  remat_policy(cfg.remat_policy)  # Validates the name.
  attention.check_name(cfg.attention_impl)


def logical_param(module: nn.Module, name: str, init: Initializer,
                  logical_axes: tuple[str | None, ...], shape: Sequence[int],
                  dtype: Any = jnp.float32) -> Array:
  """`module.param(name, nn.with_logical_partitioning(init, logical_axes), shape, dtype)`.

  Args:
    module: the module that owns the parameter (inside its compact method or setup).
    name: the parameter's name.
    init: its initializer, `init(key, shape, dtype)`.
    logical_axes: one logical axis name (or None) per dimension, for the partitioning rules.
    shape: its shape.
    dtype: its dtype (parameters stay float32 unless asked otherwise).

  Returns:
    The parameter array: `Module.param` unboxes the `nn.LogicallyPartitioned`
    the initializer makes (`unbox=True`), though Flax annotates it as returning the box.
  """
  boxed_init = nn.with_logical_partitioning(init, logical_axes)
  return cast(Array, module.param(name, boxed_init, shape, dtype))


def residual_dropout(rate: float) -> nn.Dropout:
  """T5's dropout on embeddings and residual branches: one mask per row and feature,
  shared by all positions (broadcast over the length axis -2), as T5X."""
  return nn.Dropout(rate=rate, broadcast_dims=(-2,))


def constrain_embedded(x: Array) -> Array:
  """Tags a [batch, length, embed] activation with its logical axes."""
  return nn.with_logical_constraint(x, ("batch", "length", "embed"))


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": nn.gelu,  # tanh approximation, as flax and T5X use.
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[Array], Array]:
  """Returns the activation function called `name` (see `_ACTIVATIONS`)."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


class Dense(nn.Module):
  """A dense layer with a 2-D kernel `[in_features, features]`, bias-free by default.

  Attributes:
    features: output size.
    kernel_axes: logical axis names of the kernel, e.g. `('embed', 'mlp')`.
    kernel_init: initializer of the float32 kernel.
    dtype: computation dtype (activations and matmul inputs).
    use_bias: add a float32 `bias` `[features]` (axis `kernel_axes[1]`, zeros at init).
  """
  features: int
  kernel_axes: tuple[str, str]
  kernel_init: Initializer = default_kernel_init
  dtype: jnp.dtype = jnp.float32
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., in_features] -> [..., features]."""
    kernel = logical_param(self, "kernel", self.kernel_init, self.kernel_axes,
                           (x.shape[-1], self.features))
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = logical_param(self, "bias", nn.initializers.zeros, (self.kernel_axes[1],),
                           (self.features,))
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """T5's layer norm: RMS scaling, no mean subtraction, no bias.

  Computed in float32: y = x / sqrt(mean(x^2) + epsilon) * scale.
  The parameter is called `scale`, axes `('embed',)`, initialised to ones.
  """
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x32 = jnp.asarray(x, jnp.float32)
    mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(mean_square + self.epsilon)
    scale = logical_param(self, "scale", nn.initializers.ones, ("embed",), (x.shape[-1],))
    return (y * scale).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding table `embedding: [num_embeddings, features]` (`vocab`, `embed`)."""
  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  embedding_init: Initializer = embedding_init

  def setup(self):
    self.embedding = logical_param(self, "embedding", self.embedding_init, ("vocab", "embed"),
                                   (self.num_embeddings, self.features))

  def __call__(self, ids: Array) -> Array:
    """ids: int [batch, length] -> [batch, length, features]."""
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, query: Array) -> Array:
    """query: [..., features] -> logits [..., num_embeddings] (tied output layer)."""
    return jnp.dot(query.astype(self.dtype), self.embedding.T.astype(self.dtype))


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
  """T5's bucketing of `relative_position = key_position - query_position`.

  Half the buckets (the other half holds the sign when bidirectional) are
  exact distances up to `num_buckets // 2` (halved again when bidirectional),
  the rest logarithmically spaced up to `max_distance`; farther distances
  share the last bucket. Causal (not bidirectional) attention maps every
  future position to bucket 0. Returns int32 buckets of the same shape.
  """
  ret = np.zeros_like(relative_position, dtype=np.int32)
  n = -np.asarray(relative_position)
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  with np.errstate(divide="ignore"):
    val_if_large = max_exact + (
        np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
        / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  ret += np.where(is_small, n, val_if_large)
  return ret


class RelativePositionBiases(nn.Module):
  """T5 relative position attention biases, shared by all layers of a stack.

  Parameter `rel_embedding: [num_heads, num_buckets]` (`heads`,
  `relpos_buckets`). Returns biases `[1, num_heads, query_length, key_length]`.
  """
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query_length: int, key_length: int, bidirectional: bool = True,
               query_offset: int = 0) -> Array:
    context = np.arange(query_length, dtype=np.int32)[:, None] + query_offset
    memory = np.arange(key_length, dtype=np.int32)[None, :]
    buckets = relative_position_bucket(memory - context, bidirectional=bidirectional,
                                       num_buckets=self.num_buckets,
                                       max_distance=self.max_distance)
    table = logical_param(self, "rel_embedding", relpos_init, ("heads", "relpos_buckets"),
                          (self.num_heads, self.num_buckets))
    values = jnp.take(table, jnp.asarray(buckets), axis=1)  # [heads, q, k]
    return values[None].astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Dot-product attention shared by every model family.

  Defaults are T5's: the 1/sqrt(head_dim) scaling is folded into the query
  kernel's initialisation (no scaling at run time), projections have no
  bias, logits are computed in float32, and positions enter only through
  `bias` (relative position biases).

  Parameters: `query` `[embed, heads * head_dim]`, `key` and `value`
  `[embed, kv_heads * head_dim]` (all `embed`, `joined_kv`) and `out`
  `[heads * head_dim, embed]` (`joined_kv`, `embed`).

  Options (all off by default):
    num_kv_heads: grouped-query attention (Ainslie et al. 2023): query head h
      uses key/value head h // (num_heads // num_kv_heads), as HF's
      `repeat_kv`. None: num_kv_heads = num_heads.
    rope_max_wavelength: rotary position embeddings (`rope.rotary_embedding`) on
      queries and keys at `positions` (self-attention only).
    rope_llama3: Llama 3.x frequency scaling of those (`rope.Llama3Scaling`).
    qkv_bias: biases on the query, key and value projections (Qwen2), none on `out`.
    query_scaling: 'init' (T5: folded into the query init) or 'runtime'
      (Llama / HF: queries divided by sqrt(head_dim), plain query init).
    decode: autoregressive decoding with a KV cache in the `cache`
      collection (see below).
    attention_impl: the q.k / softmax / .v kernel ('auto', 'einsum', 'xla',
      'cudnn', 'pallas', 'blocked'; see `t5xlike.models.attention`).

  KV cache (`decode=True`), per attention module:
    cached_key, cached_value: [batch, max_length, kv_heads, head_dim], the
      keys (after RoPE) and values of cache slots 0 .. cache_index - 1, in
      the activation dtype;
    cache_index: int32 scalar, the next free slot (shared by the rows).
  The cache is created, zero, by `init` with `decode=True` on inputs of
  length `max_length` (that call attends over its own inputs and writes
  nothing). Each later call with `n` new tokens (a prefill of several, or a
  single step) writes their keys/values at slots [cache_index,
  cache_index + n), advances cache_index by n and attends over all
  `max_length` slots; slots >= cache_index + n are always masked. The
  caller's `mask` is either chunk-relative, `[.., n, n]` over the new tokens
  (every earlier slot stays visible: causal or prefix masks of the chunk
  itself), or absolute, `[.., n, max_length]` over all slots (e.g. to hide
  padded slots of ragged prompts). Writing past `max_length` is not checked
  (`lax.dynamic_update_slice` clamps the start). Default positions are
  `cache_index + arange(n)`.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  float32_logits: bool = True
  num_kv_heads: int | None = None
  rope_max_wavelength: float | None = None
  rope_llama3: rope.Llama3Scaling | None = None
  qkv_bias: bool = False
  query_scaling: str = "init"
  decode: bool = False
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array,
               mask: Array | masks.StructuredMask | None = None, bias: Array | None = None,
               deterministic: bool = True, positions: Array | None = None) -> Array:
    """inputs_q: [b, q, embed]; inputs_kv: [b, k, embed]; mask: bool broadcastable
    to [b, heads, q, k], or a `masks.StructuredMask` (self-attention); bias:
    broadcastable to [b, heads, q, k]; positions: int [b, q] for RoPE
    (self-attention, default arange) -> [b, q, embed].
    With `decode=True`, k is the cache's max_length (see the class docstring)."""
    if isinstance(mask, masks.StructuredMask):
      # The dense mask is unused (and so not computed under jit) by the Pallas kernel.
      structure, mask = mask, mask.dense()
    else:
      structure = None
    kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    if self.num_heads % kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({kv_heads})")
    if self.query_scaling not in ("init", "runtime"):
      raise ValueError(f"query_scaling must be 'init' or 'runtime', got {self.query_scaling!r}")
    depth_scaling = np.sqrt(self.head_dim).astype(np.float32)

    def query_init(*args):
      return attention_kernel_init(*args) / depth_scaling

    proj = lambda name, heads, init: Dense(heads * self.head_dim, ("embed", "joined_kv"),
                                           kernel_init=init, dtype=self.dtype, name=name,
                                           use_bias=self.qkv_bias)
    query = proj("query", self.num_heads,
                 query_init if self.query_scaling == "init" else attention_kernel_init)(inputs_q)
    key = proj("key", kv_heads, attention_kernel_init)(inputs_kv)
    value = proj("value", kv_heads, attention_kernel_init)(inputs_kv)
    split = lambda x: x.reshape(x.shape[:2] + (-1, self.head_dim))
    query = checkpoint_name(split(query), "query_proj")
    key = checkpoint_name(split(key), "key_proj")
    value = checkpoint_name(split(value), "value_proj")
    query = nn.with_logical_constraint(query, ("batch", "length", "heads", "kv"))
    key = nn.with_logical_constraint(key, ("batch", "length", "heads", "kv"))
    value = nn.with_logical_constraint(value, ("batch", "length", "heads", "kv"))

    cache = self._cache_variables(key) if self.decode else None
    if self.rope_max_wavelength is not None:
      if positions is None:
        start = cache[2].value if cache is not None and cache[3] else 0
        positions = start + jnp.arange(query.shape[1], dtype=jnp.int32)[None]
      query = rope.rotary_embedding(query, positions, self.rope_max_wavelength, self.rope_llama3)
      key = rope.rotary_embedding(key, positions, self.rope_max_wavelength, self.rope_llama3)
    if cache is not None and cache[3]:
      key, value, mask = self._update_cache(cache, key, value, mask)

    if self.float32_logits:
      query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    if self.query_scaling == "runtime":
      query = query / jnp.asarray(depth_scaling, query.dtype)
    dropout = not deterministic and self.dropout_rate > 0.0
    impl = attention.resolve(self.attention_impl, self.dtype, dropout, decode=self.decode)
    if impl == "pallas" and structure is not None:
      out = attention.pallas(query, key, value, None, bias, self.dtype, causal=structure.causal,
                             segment_ids=structure.kernel_segments(),
                             requested=self.attention_impl)
    elif impl == "pallas":
      out = attention.pallas(query, key, value, mask, bias, self.dtype,
                             requested=self.attention_impl)
    else:
      out = None if impl in ("einsum", "blocked") else attention.fused(
          impl, query, key, value, mask, bias, self.dtype)
    if out is not None:
      return self._output(out, inputs_q)
    keep = None
    if not deterministic and self.dropout_rate > 0.0:
      # Same dropout for every query of a head, as T5X's broadcast_dropout.
      keep_prob = 1.0 - self.dropout_rate
      shape = (query.shape[0], self.num_heads, 1, key.shape[1])
      keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, shape)
      keep = keep.astype(self.dtype) / jnp.asarray(keep_prob, self.dtype)
    core = functools.partial(einsum_attention, dtype=self.dtype)
    if impl == "blocked":
      out = attention.batch_blocked(core, query, key, value, mask, bias)
    else:
      out = core(query, key, value, mask, bias, keep)
    return self._output(out, inputs_q)

  def _output(self, out: Array, inputs_q: Array) -> Array:
    """[b, q, heads(, group), head_dim] attention output -> `out` projection [b, q, embed]."""
    out = checkpoint_name(out.reshape(out.shape[0], out.shape[1], self.num_heads * self.head_dim),
                          "attention_out")
    out = Dense(inputs_q.shape[-1], ("joined_kv", "embed"), kernel_init=attention_kernel_init,
                dtype=self.dtype, name="out")(out)
    return out

  def _cache_variables(self, key: Array) -> tuple[Any, Any, Any, bool]:
    """(cached_key, cached_value, cache_index, initialized); created zero from
    key [b, max_length, kv_heads, head_dim] on the first (init) call."""
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, key.shape, key.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    return cached_key, cached_value, cache_index, initialized

  @staticmethod
  def _update_cache(cache, key: Array, value: Array,
                    mask: Array | None) -> tuple[Array, Array, Array]:
    """Writes n new keys/values [b, n, kv_heads, head_dim] at cache_index.

    Returns all cached keys and values [b, max_length, kv_heads, head_dim] and
    the mask [b|1, 1|heads, n, max_length] over cache slots."""
    cached_key, cached_value, cache_index, _ = cache
    new, max_length = key.shape[1], cached_key.value.shape[1]
    index = cache_index.value
    cached_key.value = lax.dynamic_update_slice(
        cached_key.value, key.astype(cached_key.value.dtype), (0, index, 0, 0))
    cached_value.value = lax.dynamic_update_slice(
        cached_value.value, value.astype(cached_value.value.dtype), (0, index, 0, 0))
    cache_index.value = index + new
    slots = jnp.arange(max_length, dtype=jnp.int32)
    if mask is None:
      full = (slots < index + new)[None, None, None, :]
    elif mask.shape[-1] == max_length:  # absolute: over all cache slots
      full = mask.astype(jnp.bool_) & (slots < index + new)
    else:  # chunk-relative: over the new tokens; earlier slots visible
      chunk = jnp.broadcast_to(mask, mask.shape[:2] + (new, new)).astype(jnp.bool_)
      earlier = jnp.broadcast_to(slots < index, chunk.shape[:3] + (max_length,))
      full = lax.dynamic_update_slice(earlier, chunk, (0, 0, 0, index))
    return cached_key.value, cached_value.value, full


class MlpBlock(nn.Module):
  """T5 feed-forward block; several activations make it gated.

  With `activations=('gelu', 'linear')` (T5.1.1's gated-GELU) the
  parameters are `wi_0`, `wi_1` `[embed, mlp]` and `wo` `[mlp, embed]`;
  with one activation (T5 v1.0's ReLU) `wi` and `wo`.
  """
  intermediate_dim: int
  activations: Sequence[str] = ("gelu", "linear")
  intermediate_dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """x: [b, length, embed] -> [b, length, embed]."""
    hidden = None
    for idx, name in enumerate(self.activations):
      dense_name = "wi" if len(self.activations) == 1 else f"wi_{idx}"
      h = activation(name)(Dense(self.intermediate_dim, ("embed", "mlp"), dtype=self.dtype,
                                 name=dense_name)(x))
      hidden = h if hidden is None else hidden * h
    hidden = checkpoint_name(nn.with_logical_constraint(hidden, ("batch", "length", "mlp")),
                             "mlp_hidden")
    hidden = nn.Dropout(rate=self.intermediate_dropout_rate, broadcast_dims=(-2,))(
        hidden, deterministic=deterministic)
    out = Dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="wo")(hidden)
    return checkpoint_name(out, "mlp_out")



def run_stack(layer_cls: type[nn.Module], num_layers: int, x: Array, *args: Any,
              scan: bool = False, remat: str | Sequence[str] = "none",
              **layer_attrs: Any) -> Array:
  """Applies `num_layers` layers `layer_cls(**layer_attrs)` to x.

  Unscanned: a Python loop of modules `layers_<i>`. Scanned: one `nn.scan`
  module `layers` whose parameters (and KV caches) are stacked on a leading
  `layers` axis; the layer is then built with `scanned=True` and must return
  `(x, None)`. `args` (masks, biases, positions, encoder output) are passed
  unchanged to every layer. `remat` is a policy name for `remat_policy`.
  Returns x after the last layer, same shape.
  """
  policy = remat_policy(remat)
  if policy is not NO_REMAT:
    layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not scan)
  if not scan:
    for i in range(num_layers):
      x = layer_cls(**layer_attrs, name=f"layers_{i}")(x, *args)
    return x
  scanned = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * len(args), length=num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  x, _ = scanned(**layer_attrs, scanned=True, name="layers")(x, *args)
  return x


#: Cache variables that are counters, not per-row arrays.
CACHE_COUNTERS = ("cache_index", "decode_position")


def gather_cache_rows(cache: Any, rows: Array, scanned: bool) -> Any:
  """The KV cache of batch rows `rows` (int [m]): every cached array taken
  along its batch axis (0, or 1 under a scanned stack's leading `layers`
  axis); counters (`CACHE_COUNTERS`) shared by the rows are kept."""
  def take(path, x):
    if getattr(path[-1], "key", None) in CACHE_COUNTERS:
      return x
    in_scan = scanned and any(getattr(k, "key", None) == "layers" for k in path)
    return jnp.take(x, rows, axis=1 if in_scan else 0)
  return jax.tree_util.tree_map_with_path(take, cache)


def cache_length(cache: Any) -> int:
  """The number of slots of a KV cache (the max_length it was created for)."""
  for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]:
    if getattr(path[-1], "key", None) == "cached_key":
      return x.shape[-3]
  raise ValueError("not a KV cache: no cached_key")


def stack_layer_params(stack: dict, num_layers: int) -> dict:
  """One stack's unscanned parameters (`layers_<i>` subtrees) -> scanned
  (one `layers` subtree, arrays with a leading `layers` axis); other entries kept."""
  tree = dict(stack)
  per_layer = [tree.pop(f"layers_{i}") for i in range(num_layers)]
  tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return tree


def unstack_layer_params(stack: dict) -> dict:
  """Inverse of `stack_layer_params`: `layers` -> `layers_<i>`."""
  tree = dict(stack)
  stacked = tree.pop("layers")
  count = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(count):
    tree[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return tree


def einsum_attention(query: Array, key: Array, value: Array, mask: Array | None,
                     bias: Array | None, keep: Array | None = None,
                     dtype: jnp.dtype = jnp.float32) -> Array:
  """The reference attention core: q.k logits, additive bias, `where` mask, softmax,
  dropout, .v (T5's einsum; bit-identical values and gradients for plain heads).

  query [b, q, heads, d]; key / value [b, k, kv_heads, d] (query head h * group
  + g uses key/value head h); mask bool and bias broadcastable to
  [b, heads, q, k]; keep: dropout's scaled keep mask [b, heads, 1, k] or None.
  Returns [b, q, heads, d] in `dtype` ([b, q, kv_heads, group, d] with groups).
  """
  batch, q_len, num_heads, head_dim = query.shape
  k_len, kv_heads = key.shape[1], key.shape[2]
  group = num_heads // kv_heads
  if group == 1:
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)
  else:
    grouped = query.reshape(batch, q_len, kv_heads, group, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", grouped, key).reshape(
        batch, num_heads, q_len, k_len)
  if bias is not None:
    logits = attention.add_bias(logits, bias)
  if mask is not None:
    logits = jnp.where(mask, logits, NEG_INF)
  weights = jax.nn.softmax(logits).astype(dtype)
  if keep is not None:
    weights = weights * keep
  if group == 1:
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value.astype(dtype))
  weights = weights.reshape(batch, kv_heads, group, q_len, k_len)
  return jnp.einsum("bhgqk,bkhd->bqhgd", weights, value.astype(dtype))

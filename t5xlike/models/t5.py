"""T5.1.1 encoder-decoder network (Raffel et al. 2020; T5.1.1 as released in T5X).

Pre-norm residual blocks with RMS layer norm (no mean, no bias), gated-GELU
MLP, no biases anywhere, relative position biases (32 buckets, max distance
128) shared across the layers of each stack, bidirectional in the encoder and
causal in the decoder, and an untied output layer (`logits_dense`). Setting
`logits_via_embedding=True` and `mlp_activations=('relu',)` gives T5 v1.0;
`relative_attention_per_layer=True` gives umT5: a table in every
self-attention layer, `<stack>/layers_<i>/relpos_bias/rel_embedding`, and no
stack-level one.

The parameter tree is T5X's:
  token_embedder/embedding                          [vocab, embed]
  encoder/relpos_bias/rel_embedding                 [heads, buckets]
  encoder/layers_<i>/pre_attention_layer_norm/scale [embed]
  encoder/layers_<i>/attention/{query,key,value}/kernel [embed, heads*kv]
  encoder/layers_<i>/attention/out/kernel           [heads*kv, embed]
  encoder/layers_<i>/pre_mlp_layer_norm/scale
  encoder/layers_<i>/mlp/{wi_0,wi_1}/kernel         [embed, mlp]
  encoder/layers_<i>/mlp/wo/kernel                  [mlp, embed]
  encoder/encoder_norm/scale
  decoder/relpos_bias/rel_embedding
  decoder/layers_<i>/{pre_self_attention_layer_norm, self_attention,
      pre_cross_attention_layer_norm, encoder_decoder_attention,
      pre_mlp_layer_norm, mlp}
  decoder/decoder_norm/scale
  decoder/logits_dense/kernel                       [embed, vocab]
With `scan_layers=True` the `layers_<i>` subtrees become one `layers` subtree
whose arrays have a leading `layers` axis (`stack_layers` / `unstack_layers`
convert between the two).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5xlike.models import layers, masks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Dimensions and options of a T5 network.

  Attributes:
    vocab_size: rows of the embedding / output layer (padded to a multiple of
      128, e.g. 32,128 for the 32,100-token T5 vocabulary).
    emb_dim: d_model.
    num_heads: attention heads.
    num_encoder_layers, num_decoder_layers: stack depths.
    head_dim: d_kv, the size of each head.
    mlp_dim: d_ff, the MLP's hidden size.
    mlp_activations: ('gelu', 'linear') for gated-GELU; ('relu',) for T5 v1.0.
    dropout_rate: dropout everywhere T5 applies it.
    logits_via_embedding: tie the output layer to the embedding (T5 v1.0).
    dtype: activation/matmul dtype name ('float32' or 'bfloat16'); parameters stay float32.
    float32_attention_logits: compute attention logits and softmax in float32.
    relative_attention_num_buckets, relative_attention_max_distance: T5 position buckets.
    relative_attention_per_layer: each self-attention layer has its own relative
      position table (umT5) instead of one per stack.
    scan_layers: run each stack as one `nn.scan` over stacked layer parameters
      (`encoder/layers/...` with a leading `layers` axis); compile time then
      does not grow with depth.
    remat_policy: what the backward pass keeps of each layer: 'none' (keep
      everything), 'full' (recompute everything), 'dots_saveable' (keep
      matmul outputs) or a list of activation names to keep (see
      `layers.ACTIVATION_NAMES`).
    attention_impl: the attention kernel: 'auto', 'einsum', 'xla', 'cudnn' or
      'pallas' (`t5xlike.models.attention`).
  """
  vocab_size: int
  emb_dim: int
  num_heads: int
  num_encoder_layers: int
  num_decoder_layers: int
  head_dim: int
  mlp_dim: int
  mlp_activations: Sequence[str] = ("gelu", "linear")
  dropout_rate: float = 0.0
  logits_via_embedding: bool = False
  dtype: str = "float32"
  float32_attention_logits: bool = True
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  relative_attention_per_layer: bool = False
  scan_layers: bool = False
  remat_policy: str | Sequence[str] = "none"
  attention_impl: str = "auto"

  def __post_init__(self):
    layers.check_network_config(self, ("vocab_size", "emb_dim", "num_heads",
                                       "num_encoder_layers", "num_decoder_layers", "head_dim",
                                       "mlp_dim"))

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)


def padded_vocab_size(vocabulary, multiple: int = 128, extra_tokens: int = 0) -> int:
  """`vocabulary.vocab_size` plus `extra_tokens` (ids an objective adds, such as
  UL2's special paradigm tokens) rounded up to a multiple of `multiple`
  (T5X: 32,100 -> 32,128), so the vocabulary axis still shards evenly."""
  return -(-(int(vocabulary.vocab_size) + int(extra_tokens)) // multiple) * multiple


def _dropout(cfg) -> nn.Dropout:
  return layers.residual_dropout(cfg.dropout_rate)


def _attention(cfg: T5Config, name: str, decode: bool = False) -> layers.MultiHeadAttention:
  return layers.MultiHeadAttention(num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                                   dropout_rate=cfg.dropout_rate, dtype=cfg.jnp_dtype,
                                   float32_logits=cfg.float32_attention_logits, decode=decode,
                                   attention_impl=cfg.attention_impl,
                                   name=name)


def _mlp(cfg: T5Config) -> layers.MlpBlock:
  return layers.MlpBlock(intermediate_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
                         intermediate_dropout_rate=cfg.dropout_rate, dtype=cfg.jnp_dtype,
                         name="mlp")


def _relpos(cfg: T5Config) -> layers.RelativePositionBiases:
  return layers.RelativePositionBiases(num_buckets=cfg.relative_attention_num_buckets,
                                       max_distance=cfg.relative_attention_max_distance,
                                       num_heads=cfg.num_heads, dtype=cfg.jnp_dtype,
                                       name="relpos_bias")


def _relpos_bias(cfg: T5Config, length: int, bidirectional: bool,
                 window: tuple[Array, int] | None = None) -> Array:
  """Biases [1, heads, length, keys] of a `relpos_bias` table made here: queries at
  0 .. length-1 over as many keys, or with `window` = (p, slots) (decoding) queries
  at p .. p+length-1 over all `slots` cache slots."""
  if window is None:
    return _relpos(cfg)(length, length, bidirectional=bidirectional)
  position, slots = window
  full = _relpos(cfg)(slots, slots, bidirectional=bidirectional)
  return jax.lax.dynamic_slice_in_dim(full, position, length, axis=2)


_constrain = layers.constrain_embedded


class EncoderLayer(nn.Module):
  """One encoder block: self-attention then MLP, each pre-normed and residual.

  With `scanned=True` it returns `(x, None)`, the carry/output pair of `nn.scan`.
  """
  config: T5Config
  deterministic: bool = True
  scanned: bool = False
  own_relpos: bool = False  # umT5: this layer's `relpos_bias` (bidirectional), not `bias`.

  @nn.compact
  def __call__(self, x: Array, bias: Array | None,
               mask: Array | masks.StructuredMask) -> Array | tuple[Array, None]:
    """x: [b, l, embed]; bias: [1, heads, l, l] or None; mask: bool [b, 1, l, l]."""
    cfg = self.config
    deterministic = self.deterministic
    if self.own_relpos:
      bias = _relpos_bias(cfg, x.shape[1], bidirectional=True)
    y = layers.RMSNorm(dtype=cfg.jnp_dtype, name="pre_attention_layer_norm")(x)
    y = _attention(cfg, "attention")(y, y, mask, bias, deterministic=deterministic)
    x = _constrain(x + _dropout(cfg)(y, deterministic=deterministic))
    y = layers.RMSNorm(dtype=cfg.jnp_dtype, name="pre_mlp_layer_norm")(x)
    y = _mlp(cfg)(y, deterministic=deterministic)
    x = _constrain(x + _dropout(cfg)(y, deterministic=deterministic))
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  """One decoder block: causal self-attention, cross-attention, MLP.

  With `decode=True` the self-attention keeps a KV cache (`cache` collection,
  see `layers.MultiHeadAttention`); cross-attention reads the encoder output.
  """
  config: T5Config
  deterministic: bool = True
  decode: bool = False
  scanned: bool = False
  own_relpos: bool = False  # umT5: this layer's `relpos_bias` (causal), not `bias`.
  max_decode_length: int | None = None  # The cache slots, with own_relpos and decode.

  @nn.compact
  def __call__(self, x: Array, encoded: Array, bias: Array | None, self_mask: Array | None,
               cross_mask: Array, decode_position: Array | None = None
               ) -> Array | tuple[Array, None]:
    """x: [b, ld, embed]; encoded: [b, le, embed]; bias: [1, heads, ld, keys] or None
    (own_relpos); decode_position: int32 [] of the first of x's tokens when decoding
    through a cache of `max_decode_length` slots (own_relpos), else None."""
    cfg = self.config
    deterministic = self.deterministic
    if self.own_relpos:
      window = None
      if decode_position is not None:
        assert self.max_decode_length is not None  # Passed with decode_position.
        window = (decode_position, self.max_decode_length)
      bias = _relpos_bias(cfg, x.shape[1], bidirectional=False, window=window)
    y = layers.RMSNorm(dtype=cfg.jnp_dtype, name="pre_self_attention_layer_norm")(x)
    y = _attention(cfg, "self_attention", self.decode)(y, y, self_mask, bias,
                                                       deterministic=deterministic)
    x = _constrain(x + _dropout(cfg)(y, deterministic=deterministic))
    y = layers.RMSNorm(dtype=cfg.jnp_dtype, name="pre_cross_attention_layer_norm")(x)
    y = _attention(cfg, "encoder_decoder_attention")(y, encoded, cross_mask, None,
                                                     deterministic=deterministic)
    x = _constrain(x + _dropout(cfg)(y, deterministic=deterministic))
    y = layers.RMSNorm(dtype=cfg.jnp_dtype, name="pre_mlp_layer_norm")(x)
    y = _mlp(cfg)(y, deterministic=deterministic)
    y = _constrain(x + _dropout(cfg)(y, deterministic=deterministic))
    return (y, None) if self.scanned else y


def _run_stack(cfg: T5Config, layer_cls: type[nn.Module], num_layers: int, x: Array,
               *args: Array | None, deterministic: bool, **layer_attrs) -> Array:
  """Applies `num_layers` layers to x: a Python loop (`layers_<i>`) or one
  `nn.scan` (`layers`, parameters stacked on a leading `layers` axis).
  `args` are passed unchanged to every layer (masks, biases, encoder output)."""
  return layers.run_stack(layer_cls, num_layers, x, *args, scan=cfg.scan_layers,
                          remat=cfg.remat_policy, config=cfg, deterministic=deterministic,
                          **layer_attrs)


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: layers.Embed

  @nn.compact
  def __call__(self, tokens: Array, mask: Array, deterministic: bool) -> Array:
    """tokens: int [b, l]; mask: bool [b, 1, l, l] -> encoded [b, l, embed]."""
    cfg = self.config
    length = tokens.shape[-1]
    per_layer = cfg.relative_attention_per_layer
    bias = None if per_layer else _relpos(cfg)(length, length, bidirectional=True)
    x = _dropout(cfg)(self.shared_embedding(tokens), deterministic=deterministic)
    x = _constrain(x)
    x = _run_stack(cfg, EncoderLayer, cfg.num_encoder_layers, x, bias, mask,
                   deterministic=deterministic, own_relpos=per_layer)
    x = layers.RMSNorm(dtype=cfg.jnp_dtype, name="encoder_norm")(x)
    return _dropout(cfg)(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: layers.Embed

  @nn.compact
  def __call__(self, encoded: Array, tokens: Array, self_mask: Array | None, cross_mask: Array,
               deterministic: bool, decode: bool = False,
               max_decode_length: int | None = None) -> Array:
    """encoded: [b, le, embed]; tokens: int [b, ld] -> logits float32 [b, ld, vocab].

    With `decode=True`, `tokens` are the next ld tokens of every row, written
    to a KV cache of `max_decode_length` slots; `self_mask` is then None
    (every earlier token visible) and the relative position biases are those
    of positions p .. p + ld - 1, where p = `decode_position`, a `cache`
    variable counting the tokens fed so far (the first, `init`, call with
    ld = max_decode_length creates the cache and counts nothing).
    """
    cfg = self.config
    length = tokens.shape[-1]
    window = None
    if decode and self.has_variable("cache", "decode_position"):
      position = self.variable("cache", "decode_position", lambda: jnp.array(0, jnp.int32))
      assert max_decode_length is not None  # The cache length, which decoding calls pass.
      window = (position.value, max_decode_length)
      position.value = position.value + length
    elif decode:
      self.variable("cache", "decode_position", lambda: jnp.array(0, jnp.int32))
    per_layer = cfg.relative_attention_per_layer
    bias = None if per_layer else _relpos_bias(cfg, length, bidirectional=False, window=window)
    y = _dropout(cfg)(self.shared_embedding(tokens), deterministic=deterministic)
    y = _constrain(y)
    y = _run_stack(cfg, DecoderLayer, cfg.num_decoder_layers, y, encoded, bias, self_mask,
                   cross_mask, None if window is None else window[0],
                   deterministic=deterministic, decode=decode, own_relpos=per_layer,
                   max_decode_length=max_decode_length if per_layer else None)
    y = layers.RMSNorm(dtype=cfg.jnp_dtype, name="decoder_norm")(y)
    y = _dropout(cfg)(y, deterministic=deterministic)
    if cfg.logits_via_embedding:
      logits = self.shared_embedding.attend(y) / jnp.sqrt(y.shape[-1]).astype(y.dtype)
    else:
      logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.jnp_dtype,
                            name="logits_dense")(y)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)


class Transformer(nn.Module):
  """The T5 encoder-decoder network.

  `__call__(encoder_input_tokens [b, le], decoder_input_tokens [b, ld],
  decoder_target_tokens [b, ld])` returns float32 logits `[b, ld, vocab]`.
  Token id 0 is padding; `decoder_target_tokens > 0` marks real decoder
  positions (the decoder input starts with id 0 as BOS, so its padding
  cannot be read off the inputs). Optional `*_segment_ids` restrict
  attention to packed segments.
  """
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.jnp_dtype)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             deterministic: bool = True) -> Array:
    mask = masks.bidirectional_mask(encoder_input_tokens > 0, encoder_segment_ids)
    return self.encoder(encoder_input_tokens, mask, deterministic)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array | None, encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None, deterministic: bool = True,
             decode: bool = False, max_decode_length: int | None = None) -> Array:
    """Decoder logits float32 [b, ld, vocab] given the encoder output [b, le, embed].

    Args:
      encoded: the encoder output [b, le, embed].
      encoder_input_tokens: int [b, le] (0 = padding: not attended to).
      decoder_input_tokens: int [b, ld], the targets shifted right.
      decoder_target_tokens: int [b, ld] (0 = padding), or None with `decode`.
      encoder_segment_ids: int [b, le] of packed inputs, or None.
      decoder_segment_ids: int [b, ld] of packed targets (needs `encoder_segment_ids`).
      deterministic: no dropout.
      decode: `decoder_input_tokens` are the next tokens of every row, fed
        through a KV cache of `max_decode_length` slots (see `Decoder`; the
        `cache` collection mutable); the target tokens and segment ids are
        ignored.
      max_decode_length: cache slots (with `decode`).
    """
    if decode:
      cross_mask = masks.attention_mask(jnp.ones(decoder_input_tokens.shape, jnp.bool_),
                                         encoder_input_tokens > 0)
      return self.decoder(encoded, decoder_input_tokens, None, cross_mask, deterministic,
                          decode=True, max_decode_length=max_decode_length)
    if decoder_target_tokens is None:
      raise ValueError("decoder_target_tokens is required unless decode=True")
    target_valid = decoder_target_tokens > 0
    self_mask = masks.attention_mask(target_valid, target_valid)
    self_mask = self_mask & masks.causal_mask(decoder_target_tokens.shape[-1])
    cross_mask = masks.attention_mask(target_valid, encoder_input_tokens > 0)
    if decoder_segment_ids is not None:
      if encoder_segment_ids is None:
        raise ValueError("decoder_segment_ids (packed targets) need encoder_segment_ids")
      self_mask = self_mask & masks.segment_mask(decoder_segment_ids, decoder_segment_ids)
      cross_mask = cross_mask & masks.segment_mask(decoder_segment_ids, encoder_segment_ids)
    return self.decoder(encoded, decoder_input_tokens, self_mask, cross_mask, deterministic)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None, deterministic: bool = True) -> Array:
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, deterministic)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       deterministic)


def stack_layers(params: dict, num_encoder_layers: int, num_decoder_layers: int) -> dict:
  """Unscanned parameters (`layers_<i>`) -> scanned (`layers`, leading layer axis)."""
  out = dict(params)
  for stack, count in (("encoder", num_encoder_layers), ("decoder", num_decoder_layers)):
    tree = dict(params[stack])
    per_layer = [tree.pop(f"layers_{i}") for i in range(count)]
    tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    out[stack] = tree
  return out


def unstack_layers(params: dict) -> dict:
  """Scanned parameters (`layers`) -> unscanned (`layers_<i>`)."""
  out = dict(params)
  for stack in ("encoder", "decoder"):
    tree = dict(params[stack])
    stacked = tree.pop("layers")
    count = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(count):
      tree[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    out[stack] = tree
  return out

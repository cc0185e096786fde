"""Encoder-only networks (BERT / ELECTRA family) and the masked-LM model.

The encoder is T5's (pre-norm RMSNorm blocks, bias-free projections; the
layer is `t5.EncoderLayer` itself, run by `layers.run_stack`, so scanning and
remat policies work as in T5) with BERT/ELECTRA's learned absolute position
embeddings instead of relative position biases: generator and discriminator
can then share both the token and the position tables (Clark et al. 2020,
"ELECTRA: Pre-training Text Encoders as Discriminators Rather Than
Generators", §3.2 "Weight sharing"). `position_encoding='alibi'` replaces the
position table by ALiBi attention biases (`t5xlike.models.alibi`), as
MosaicBERT does (Portes et al. 2023; with GeGLU blocks, `mlp_activations=
('gelu', 'linear')`, and unpadded = packed rows: `objectives/mosaicbert.gin`).

Modules:
  Embedder      token table [vocab, embedding_dim] + position table
                [max_length, embedding_dim]; shareable between networks.
  EncoderStack  (optional embedding projection) + layers + final norm.
  MLMHead       BERT/ELECTRA masked-LM head: dense, gelu, norm, logits
                through the shared token table transposed, plus a bias.
  BinaryHead    ELECTRA discriminator head: dense, gelu, one logit per token.
  ClassificationHead  sequence classification (GLUE-style fine-tuning): pooled
                representation, dense, gelu, dropout, class logits.
  EncoderNetwork  Embedder (own or shared) + EncoderStack + one head.

Parameter tree of `EncoderNetwork(config, head='mlm')` (`head='binary'`
replaces `mlm_head` by `binary_head`, `head='classifier'` by `classifier`):
  embedder/token_embedder/embedding          [vocab, embedding_dim]  (vocab, embed)
  embedder/position_embedding                [max_length, embedding_dim] (length, embed),
                                             absent under position_encoding='alibi'
  encoder/embedding_projection/kernel        [embedding_dim, emb_dim] (embed, mlp),
                                             only when embedding_dim != emb_dim
  encoder/layers_<i>/pre_attention_layer_norm/scale, attention/{query,key,value,out}/kernel,
      pre_mlp_layer_norm/scale, mlp/{wi,wo}/kernel      (as T5's encoder)
  encoder/encoder_norm/scale                 [emb_dim]
  mlm_head/dense/kernel                      [emb_dim, embedding_dim] (mlp, embed)
  mlm_head/layer_norm/scale                  [embedding_dim]
  mlm_head/output_bias                       [vocab]
  binary_head/dense/kernel                   [emb_dim, emb_dim] (embed, mlp)
  binary_head/logit/kernel                   [emb_dim] (mlp,)
  classifier/dense/kernel                    [emb_dim, emb_dim] (embed, mlp)
  classifier/out/kernel                      [emb_dim, num_classes] (mlp, None)
  classifier/out/bias                        [num_classes] (None,)
The body (`embedder`, `encoder`) is named the same under every head, so a
discriminator exported by ELECTRA (`{embedder, encoder, binary_head}`)
restores into a classifier (`{embedder, encoder, classifier}`): see
`t5xlike.checkpoints.restore_matching_params`.
With `scan_layers=True` the `layers_<i>` subtrees become one `layers` subtree.
Flax refuses a logical name twice in one array, so the two maps between the
tables' width and a network's hidden size name the tables' side `embed`
(as the tables) and the other side `mlp`. `length` (the position table) is
already in every rules preset of `t5xlike.partitioning` (replicated).

Batches (feature converter `encoder`), all [batch, length]:
  encoder_input_tokens   int32, the corrupted input (0 = padding)
  encoder_target_tokens  int32, the original token at every position
  mlm_weights            float32, 1.0 where the masked-LM prediction is scored
  encoder_segment_ids, encoder_positions  optional (packing)
Classification batches (feature converter `encoder_classification`, model
`t5xlike.models.classifier.ClassifierModel`): `encoder_input_tokens` int32
[batch, length] and `classification_labels` int32 [batch].
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5xlike.models import alibi, base, layers, masks, t5

Array = jax.Array
Batch = Mapping[str, Array]

HEADS = ("mlm", "binary", "classifier", "none")
POSITION_ENCODINGS = ("learned", "alibi")
POOLINGS = ("mean", "first")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Dimensions and options of an encoder-only network.

  The attribute names shared with `t5.T5Config` (num_heads, head_dim,
  mlp_dim, mlp_activations, dropout_rate, float32_attention_logits,
  jnp_dtype) are what `t5.EncoderLayer` reads, so the blocks are T5's own.

  Attributes:
    vocab_size: rows of the token table (padded, e.g. `t5.padded_vocab_size`).
    emb_dim: hidden size of the transformer (d_model).
    num_heads, head_dim: attention heads and their size.
    num_layers: depth.
    mlp_dim: the MLP's hidden size.
    mlp_activations: ('gelu',) as BERT/ELECTRA (a single, ungated MLP);
      ('gelu', 'linear') for T5.1.1's gated GELU.
    max_length: rows of the learned absolute position table: sequences of at
      most max_length tokens (checked), `encoder_positions` < max_length
      (not checked: `jnp.take` clamps). Unused under ALiBi (no table; ALiBi
      extrapolates to longer sequences).
    position_encoding: 'learned' (BERT/ELECTRA's absolute position table) or
      'alibi' (no table; the symmetric ALiBi bias -m_h |i - j| added to every
      layer's attention logits, MosaicBERT §2.1; `t5xlike.models.alibi`).
    embedding_dim: width of the token and position tables (None: emb_dim).
      When it differs from emb_dim, a bias-free `embedding_projection` maps
      embeddings to emb_dim, as ELECTRA's smaller generator does with
      embeddings shared with the discriminator (ELECTRA §3.2; Appendix A,
      Table 6 "Embedding Size").
    dropout_rate: dropout on embeddings, in every block and after the stack.
    dtype: activation/matmul dtype name; parameters stay float32.
    float32_attention_logits: attention logits and softmax in float32.
    scan_layers, remat_policy: as in `t5.T5Config`.
    attention_impl: as in `t5.T5Config`.
  """
  vocab_size: int
  emb_dim: int
  num_heads: int
  num_layers: int
  head_dim: int
  mlp_dim: int
  mlp_activations: Sequence[str] = ("gelu",)
  max_length: int = 512
  embedding_dim: int | None = None
  dropout_rate: float = 0.0
  dtype: str = "float32"
  float32_attention_logits: bool = True
  scan_layers: bool = False
  remat_policy: str | Sequence[str] = "none"
  attention_impl: str = "auto"
  position_encoding: str = "learned"

  def __post_init__(self):
    layers.check_network_config(self, ("vocab_size", "emb_dim", "num_heads", "num_layers",
                                       "head_dim", "mlp_dim", "max_length"))
    if self.position_encoding not in POSITION_ENCODINGS:
      raise ValueError(f"EncoderConfig.position_encoding must be one of {POSITION_ENCODINGS}, "
                       f"got {self.position_encoding!r}")
    if self.embedding_dim is not None and int(self.embedding_dim) <= 0:
      raise ValueError(f"EncoderConfig.embedding_dim must be positive, got {self.embedding_dim}")

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def embedding_size(self) -> int:
    """Width of the token and position tables (embedding_dim, or emb_dim when None)."""
    return self.emb_dim if self.embedding_dim is None else int(self.embedding_dim)

  @property
  def learned_positions(self) -> bool:
    """Whether the embedder holds a position table (False under ALiBi)."""
    return self.position_encoding == "learned"


def _dropout(cfg) -> nn.Dropout:
  return layers.residual_dropout(cfg.dropout_rate)


def _normal_vector_init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
  """N(0, 1/n) for a vector of n weights (a fan-in init for a [n] -> 1 projection)."""
  return jax.random.normal(key, shape, dtype) / np.sqrt(shape[0]).astype(np.float32)


class Embedder(nn.Module):
  """Token and learned absolute position embeddings, summed.

  Parameters: `token_embedder/embedding [vocab_size, features]`
  (`vocab`, `embed`) and `position_embedding [max_length, features]`
  (`length`, `embed`); with `learned_positions=False` (ALiBi) the token
  table alone, and positions are ignored. One instance can be passed to
  several networks (ELECTRA's generator and discriminator): its parameters
  then live once, where the instance was created.
  """
  vocab_size: int
  features: int
  max_length: int
  dtype: jnp.dtype = jnp.float32
  learned_positions: bool = True

  def setup(self):
    self.token_embedder = layers.Embed(self.vocab_size, self.features, dtype=self.dtype)
    if self.learned_positions:
      self.position_embedding = layers.logical_param(
          self, "position_embedding", layers.embedding_init, ("length", "embed"),
          (self.max_length, self.features))

  def __call__(self, tokens: Array, positions: Array | None = None) -> Array:
    """tokens: int [b, l]; positions: int [b, l] or None (0..l-1) -> [b, l, features]."""
    if not self.learned_positions:
      return self.token_embedder(tokens)
    length = tokens.shape[-1]
    if length > self.max_length:
      raise ValueError(f"sequence length {length} exceeds the position table "
                       f"(max_length={self.max_length})")
    if positions is None:
      pos = self.position_embedding[:length][None]
    else:
      pos = jnp.take(self.position_embedding, positions, axis=0)
    return self.token_embedder(tokens) + pos.astype(self.dtype)

  def attend(self, query: Array) -> Array:
    """query: [..., features] -> [..., vocab_size], through the token table transposed."""
    return self.token_embedder.attend(query)


class EncoderStack(nn.Module):
  """Embeddings [b, l, embedding_dim] -> hidden states [b, l, emb_dim].

  (Bias-free `embedding_projection` when embedding_dim != emb_dim), dropout,
  `num_layers` T5 encoder blocks (bidirectional self-attention; no position
  bias, or ALiBi's under position_encoding='alibi'), final RMSNorm
  `encoder_norm`, dropout.
  """
  config: EncoderConfig

  @nn.compact
  def __call__(self, embedded: Array, mask: Array | masks.StructuredMask,
               deterministic: bool = True) -> Array:
    """embedded: [b, l, embedding_dim]; mask: bool [b, 1, l, l] -> [b, l, emb_dim]."""
    cfg = self.config
    x = embedded
    if x.shape[-1] != cfg.emb_dim:
      x = layers.Dense(cfg.emb_dim, ("embed", "mlp"), dtype=cfg.jnp_dtype,
                       name="embedding_projection")(x)
    x = _dropout(cfg)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    # t5.EncoderLayer(x, bias, mask): ALiBi's bias [1, heads, l, l] or none.
    bias = (alibi.bias(cfg.num_heads, x.shape[1]) if cfg.position_encoding == "alibi"
            else None)
    x = layers.run_stack(t5.EncoderLayer, cfg.num_layers, x, bias, mask, scan=cfg.scan_layers,
                         remat=cfg.remat_policy, config=cfg, deterministic=deterministic)
    x = layers.RMSNorm(dtype=cfg.jnp_dtype, name="encoder_norm")(x)
    return _dropout(cfg)(x, deterministic=deterministic)


class MLMHead(nn.Module):
  """Masked-LM head (BERT §3.1 / Appendix A; ELECTRA's generator).

  hidden [b, l, emb_dim] -> dense to embedding_dim -> gelu -> RMSNorm ->
  logits through the shared token table transposed, divided by
  sqrt(embedding_dim) (the table is N(0, 1), as T5's tied logits) -> plus
  `output_bias [vocab]`. Returns float32 logits [b, l, vocab].
  """
  config: EncoderConfig

  @nn.compact
  def __call__(self, hidden: Array, embedder: Embedder) -> Array:
    cfg = self.config
    features = cfg.embedding_size
    h = layers.Dense(features, ("mlp", "embed"), dtype=cfg.jnp_dtype, name="dense")(hidden)
    h = layers.RMSNorm(dtype=cfg.jnp_dtype, name="layer_norm")(nn.gelu(h))
    logits = embedder.attend(h) / jnp.sqrt(features).astype(h.dtype)
    bias = layers.logical_param(self, "output_bias", nn.initializers.zeros, ("vocab",),
                                (cfg.vocab_size,))
    logits = logits.astype(jnp.float32) + bias
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class _VectorProjection(nn.Module):
  """[..., n] -> [...]: a dot product with `kernel [n]` (logical axis `axis`), N(0, 1/n) init."""
  axis: str
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = layers.logical_param(self, "kernel", _normal_vector_init, (self.axis,),
                                  (x.shape[-1],))
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class BinaryHead(nn.Module):
  """Per-token binary head (ELECTRA's discriminator, §2): dense, gelu, one logit.

  hidden [b, l, emb_dim] -> float32 logits [b, l]: the logit that the token
  was replaced. Parameters `dense/kernel [emb_dim, emb_dim]` (`embed`,
  `mlp`) and `logit/kernel [emb_dim]` (`mlp`); no biases (the repository's
  convention; ELECTRA's TF code has them).
  """
  config: EncoderConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.config
    h = layers.Dense(cfg.emb_dim, ("embed", "mlp"), dtype=cfg.jnp_dtype, name="dense")(hidden)
    logits = _VectorProjection("mlp", dtype=cfg.jnp_dtype, name="logit")(nn.gelu(h))
    return logits.astype(jnp.float32)


def pool(hidden: Array, tokens: Array, pooling: str = "mean") -> Array:
  """One vector per sequence: hidden [b, l, d], tokens int [b, l] -> [b, d].

  'mean': the average over the non-padding positions (tokens > 0; a row of
  padding only gives zeros). 'first': the first position, as BERT / ELECTRA
  read their [CLS] token (meaningful only when the data starts every
  sequence with such a token).
  """
  if pooling == "first":
    return hidden[:, 0]
  if pooling != "mean":
    raise ValueError(f"unknown pooling {pooling!r}; known: {POOLINGS}")
  valid = (tokens > 0).astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * valid, axis=1)
  return (total / jnp.maximum(jnp.sum(valid, axis=1), 1.0)).astype(hidden.dtype)


class _Logits(nn.Module):
  """[..., n] -> float32 [..., features]: `kernel [n, features]` (mlp, None) plus
  `bias [features]` (the class prior), both float32."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = layers.logical_param(self, "kernel", layers.default_kernel_init, ("mlp", None),
                                  (x.shape[-1], self.features))
    bias = layers.logical_param(self, "bias", nn.initializers.zeros, (None,), (self.features,))
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)).astype(jnp.float32) + bias


class ClassificationHead(nn.Module):
  """Sequence classification head (BERT §4.1's classification layer on a pooled vector).

  hidden [b, l, emb_dim] -> `pool` ('mean' over non-padding tokens, or the
  'first' token) [b, emb_dim] -> `dense` [emb_dim, emb_dim] -> gelu ->
  dropout (config.dropout_rate) -> `out` -> float32 logits [b, num_classes].
  Parameters `dense/kernel` (`embed`, `mlp`; bias-free like the blocks),
  `out/kernel` (`mlp`, None) and `out/bias` (None,); the class axis is small
  and never sharded.

  Pooling defaults to 'mean': the task data here carries no [CLS] token
  (inputs are plain token ids + EOS), and under a bidirectional encoder the
  first position is just the first word. 'first' reproduces BERT/ELECTRA
  when the inputs do start with [CLS]. A row holds one sequence (no packing:
  mean pooling would mix packed segments).
  """
  config: EncoderConfig
  num_classes: int
  pooling: str = "mean"

  @nn.compact
  def __call__(self, hidden: Array, tokens: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    pooled = pool(hidden, tokens, self.pooling)
    h = layers.Dense(cfg.emb_dim, ("embed", "mlp"), dtype=cfg.jnp_dtype, name="dense")(pooled)
    # Plain dropout: `residual_dropout` shares a mask along axis -2, here the batch.
    h = nn.Dropout(rate=cfg.dropout_rate)(nn.gelu(h), deterministic=deterministic)
    return _Logits(self.num_classes, dtype=cfg.jnp_dtype, name="out")(h)


class EncoderNetwork(nn.Module):
  """An encoder-only network with one head.

  `__call__(encoder_input_tokens [b, l], encoder_segment_ids=None,
  encoder_positions=None, deterministic=True)` returns float32 logits:
  [b, l, vocab] for head='mlm', [b, l] for head='binary', [b, num_classes]
  for head='classifier', and the hidden states [b, l, emb_dim] for
  head='none'. Token id 0 is padding (masked out of attention); segment ids
  restrict attention to packed segments.

  Attributes:
    config: the EncoderConfig.
    head: 'mlm', 'binary', 'classifier' or 'none'.
    shared_embedder: an `Embedder` created by a parent module (ELECTRA's
      generator and discriminator share one); None creates `embedder` here.
    num_classes: classes of head='classifier' (unused by the other heads).
    pooling: 'mean' or 'first', the classifier's pooling (`pool`).
  """
  config: EncoderConfig
  head: str = "mlm"
  shared_embedder: Embedder | None = None
  num_classes: int = 2
  pooling: str = "mean"

  def setup(self):
    cfg = self.config
    if self.head not in HEADS:
      raise ValueError(f"unknown encoder head {self.head!r}; known: {HEADS}")
    if self.shared_embedder is None:
      self.embedder = Embedder(cfg.vocab_size, cfg.embedding_size, cfg.max_length,
                               dtype=cfg.jnp_dtype,
                               learned_positions=cfg.learned_positions)
    self.encoder = EncoderStack(cfg)
    if self.head == "mlm":
      self.mlm_head = MLMHead(cfg)
    elif self.head == "binary":
      self.binary_head = BinaryHead(cfg)
    elif self.head == "classifier":
      if int(self.num_classes) < 2:
        raise ValueError(f"a classifier needs num_classes >= 2, got {self.num_classes}")
      if self.pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {self.pooling!r}; known: {POOLINGS}")
      self.classifier = ClassificationHead(cfg, int(self.num_classes), self.pooling)

  def _get_embedder(self) -> Embedder:
    return self.embedder if self.shared_embedder is None else self.shared_embedder

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             encoder_positions: Array | None = None, deterministic: bool = True) -> Array:
    """Hidden states [b, l, emb_dim] of tokens [b, l]."""
    valid = encoder_input_tokens > 0
    mask: Array | masks.StructuredMask
    if masks.wants_structured_mask(self.config.attention_impl):
      mask = masks.StructuredMask(valid, encoder_segment_ids, causal=False)
    else:
      mask = masks.bidirectional_mask(valid, encoder_segment_ids)
    embedded = self._get_embedder()(encoder_input_tokens, encoder_positions)
    return self.encoder(embedded, mask, deterministic=deterministic)

  def __call__(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None, deterministic: bool = True) -> Array:
    hidden = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                         deterministic)
    if self.head == "mlm":
      return self.mlm_head(hidden, self._get_embedder())
    if self.head == "binary":
      return self.binary_head(hidden)
    if self.head == "classifier":
      return self.classifier(hidden, encoder_input_tokens, deterministic)
    return hidden


class MLMModel(base.TokenModel):
  """BERT's masked-LM model (Devlin et al. 2019, §3.1): loss over masked positions.

  Args:
    network: an `EncoderNetwork` with head='mlm' (logits [b, l, vocab]).
    vocabulary: the model's (seqio) vocabulary; checked against the table size.
    z_loss: coefficient of log(Z)^2 added to the loss (0 as BERT).

  Batches come from the `encoder` feature converter (see the module
  docstring); the loss is the mean cross entropy over positions with
  `mlm_weights` = 1, so `weight_sum` is the number of masked tokens.
  """

  feature_names = ("encoder_input_tokens", "encoder_target_tokens", "mlm_weights")
  #: The feature converter (`t5xlike.data.feature_converters.CONVERTERS`) that makes its batches.
  feature_converter = "encoder"

  target_feature = "encoder_target_tokens"
  weight_feature = "mlm_weights"

  def __init__(self, network: EncoderNetwork, vocabulary: Any = None, z_loss: float = 0.0):
    if network.head != "mlm":
      raise ValueError(f"MLMModel needs an EncoderNetwork with head='mlm', got {network.head!r}")
    super().__init__(network, vocabulary, z_loss=z_loss)

  def init(self, rng: Array, batch: Batch) -> Any:
    """The (logically boxed) variables for a batch of these shapes."""
    return self.network.init(rng, batch["encoder_input_tokens"], deterministic=True)

  def logits(self, params: Any, batch: Batch, dropout_rng: Array | None = None) -> Array:
    """float32 logits [b, l, vocab]; dropout on when a rng is given."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    # `apply` without `mutable` returns the network's output alone.
    return cast(Array, self.network.apply(
        {"params": params}, batch["encoder_input_tokens"],
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        deterministic=dropout_rng is None, rngs=rngs))


def check_vocabulary(vocabulary: Any, config: EncoderConfig) -> None:
  """Raises ValueError when the vocabulary has more ids than the token table rows."""
  base.check_vocabulary(vocabulary, config.vocab_size)

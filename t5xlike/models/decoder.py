"""Llama-style decoder-only network and its model (loss; decoding with a KV cache).

The network (Touvron et al. 2023, as in HF's `LlamaForCausalLM`): token
embedding, pre-norm residual blocks with RMS norm, self-attention with rotary
position embeddings (`rotate_half` layout), optional grouped-query attention
and queries scaled by 1/sqrt(head_dim) at run time, a SwiGLU MLP, a final
RMS norm and an output layer; no biases (Qwen2's `qkv_bias`: on q/k/v only).
Llama 3.x's RoPE frequency scaling is `rope_type='llama3'`. Masks follow T5X's
DecoderOnly: causal, prefix LM (`decoder_causal_attention`) and packing
(`decoder_segment_ids`, with `decoder_positions` restarting at 0 per segment).

The parameter tree is T5X DecoderOnly's naming (the embedding sits at the top
level, as in `t5.Transformer`, not under `decoder/`):
  token_embedder/embedding                                 [vocab, embed]
  decoder/layers_<i>/pre_self_attention_layer_norm/scale   [embed]
  decoder/layers_<i>/self_attention/query/kernel           [embed, heads*head_dim]
  decoder/layers_<i>/self_attention/{key,value}/kernel     [embed, kv_heads*head_dim]
  decoder/layers_<i>/self_attention/{query,key,value}/bias  [(kv_)heads*head_dim] (qkv_bias)
  decoder/layers_<i>/self_attention/out/kernel             [heads*head_dim, embed]
  decoder/layers_<i>/pre_mlp_layer_norm/scale              [embed]
  decoder/layers_<i>/mlp/{wi_0,wi_1}/kernel                [embed, mlp]
  decoder/layers_<i>/mlp/wo/kernel                         [mlp, embed]
  decoder/decoder_norm/scale                               [embed]
  decoder/logits_dense/kernel                              [embed, vocab] (untied only)
With `scan_layers=True` the `layers_<i>` subtrees become one `layers` subtree
with a leading `layers` axis (`stack_layers` / `unstack_layers`).

HF Llama names (kernels here are HF's `weight` transposed, `[in, out]`):
  model.embed_tokens                          token_embedder/embedding
  model.layers.<i>.input_layernorm            decoder/layers_<i>/pre_self_attention_layer_norm
  model.layers.<i>.self_attn.{q,k,v,o}_proj   .../self_attention/{query,key,value,out}
  model.layers.<i>.post_attention_layernorm   .../pre_mlp_layer_norm
  model.layers.<i>.mlp.gate_proj              .../mlp/wi_0 (the SiLU branch)
  model.layers.<i>.mlp.up_proj                .../mlp/wi_1 (the linear branch)
  model.layers.<i>.mlp.down_proj              .../mlp/wo
  model.norm                                  decoder/decoder_norm
  lm_head                                     decoder/logits_dense
Tied embeddings (`tie_embeddings=True`, HF `tie_word_embeddings`) compute
logits = x @ embedding.T with no 1/sqrt(emb_dim) rescaling (Llama/HF style;
T5 v1.0 and T5X's DecoderOnly rescale).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5xlike.inference import prepacking
from t5xlike.models import base, layers, masks, rope

Array = jax.Array
Batch = Mapping[str, Array]

INPUT_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Dimensions and options of a decoder-only network.

  Attributes:
    vocab_size: rows of the embedding / output layer (pad to a multiple of 128).
    emb_dim: d_model.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention when < num_heads;
      must divide num_heads).
    num_layers: depth.
    head_dim: size of each head (even, for RoPE).
    mlp_dim: hidden size of the MLP.
    mlp_activations: ('silu', 'linear') is SwiGLU (gate, up).
    rope_max_wavelength: RoPE base (Llama 1/2: 10,000; Llama 3: 500,000).
    rope_type: 'default' (plain RoPE) or 'llama3' (Llama 3.x frequency scaling,
      HF `rope_type: 'llama3'`, with the four `rope_*` fields below; `rope.Llama3Scaling`).
    rope_factor: llama3: the slow-down of the low frequencies (Llama 3.1: 8).
    rope_low_freq_factor: llama3: wavelengths above
      rope_original_max_positions / rope_low_freq_factor positions are slowed down (1).
    rope_high_freq_factor: llama3: wavelengths below
      rope_original_max_positions / rope_high_freq_factor are kept (4).
    rope_original_max_positions: llama3: the pretraining context length (8192).
    qkv_bias: biases on the query/key/value projections, none on the output
      projection (Qwen2 / Qwen2.5); `.../self_attention/{query,key,value}/bias`.
    tie_embeddings: output layer = embedding transposed (no `logits_dense`).
    norm_epsilon: RMS norm epsilon (Llama: 1e-5 or 1e-6).
    dropout_rate: dropout on the embedding, residual branches, attention
      weights and MLP hidden units (0 for Llama).
    dtype: activation/matmul dtype name ('float32' or 'bfloat16'); parameters stay float32.
    float32_attention_logits: compute attention logits and softmax in float32.
    scan_layers: run the layers as one `nn.scan` over stacked parameters.
    remat_policy: 'none', 'full', 'dots_saveable' or a list of activation
      names to keep (see `layers.ACTIVATION_NAMES`).
    attention_impl: the attention kernel: 'auto', 'einsum', 'xla', 'cudnn' or
      'pallas' (`t5xlike.models.attention`).
  """
  vocab_size: int
  emb_dim: int
  num_heads: int
  num_kv_heads: int
  num_layers: int
  head_dim: int
  mlp_dim: int
  mlp_activations: Sequence[str] = ("silu", "linear")
  rope_max_wavelength: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  qkv_bias: bool = False
  tie_embeddings: bool = False
  norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: str = "float32"
  float32_attention_logits: bool = True
  scan_layers: bool = False
  remat_policy: str | Sequence[str] = "none"
  attention_impl: str = "auto"

  def __post_init__(self):
    layers.check_network_config(self, ("vocab_size", "emb_dim", "num_heads", "num_kv_heads",
                                       "num_layers", "head_dim", "mlp_dim"))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"DecoderConfig.num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"DecoderConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.rope_max_wavelength <= 0 or self.norm_epsilon <= 0:
      raise ValueError("DecoderConfig.rope_max_wavelength and norm_epsilon must be positive, "
                       f"got {self.rope_max_wavelength} and {self.norm_epsilon}")
    if self.rope_type not in ("default", "llama3"):
      raise ValueError(f"DecoderConfig.rope_type must be 'default' or 'llama3', "
                       f"got {self.rope_type!r}")
    _ = self.rope_llama3  # Validates the scaling.
    for name in self.mlp_activations:
      layers.activation(name)  # Validates the name.
    jnp.dtype(self.dtype)  # Validates the name.

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def rope_llama3(self) -> rope.Llama3Scaling | None:
    """The Llama 3.x scaling of RoPE's frequencies, or None (rope_type 'default')."""
    if self.rope_type != "llama3":
      return None
    return rope.Llama3Scaling(float(self.rope_factor), float(self.rope_low_freq_factor),
                              float(self.rope_high_freq_factor),
                              int(self.rope_original_max_positions))


def _dropout(cfg) -> nn.Dropout:
  return layers.residual_dropout(cfg.dropout_rate)


_constrain = layers.constrain_embedded


class DecoderLayer(nn.Module):
  """One block: pre-norm self-attention (RoPE, GQA) then pre-norm SwiGLU MLP, both residual.

  With `scanned=True` it returns `(x, None)`, the carry/output pair of `nn.scan`.
  """
  config: DecoderConfig
  deterministic: bool = True
  decode: bool = False
  scanned: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array | masks.StructuredMask,
               positions: Array | None) -> Array | tuple[Array, None]:
    """x: [b, l, embed]; mask: bool [b, 1, l, l] (with decode: see
    `layers.MultiHeadAttention`); positions: int [b, l] or None -> [b, l, embed]."""
    cfg = self.config
    deterministic = self.deterministic
    norm = lambda name: layers.RMSNorm(epsilon=cfg.norm_epsilon, dtype=cfg.jnp_dtype, name=name)
    y = norm("pre_self_attention_layer_norm")(x)
    y = layers.MultiHeadAttention(
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
        rope_max_wavelength=cfg.rope_max_wavelength, rope_llama3=cfg.rope_llama3,
        qkv_bias=cfg.qkv_bias, query_scaling="runtime",
        dropout_rate=cfg.dropout_rate, dtype=cfg.jnp_dtype,
        float32_logits=cfg.float32_attention_logits, decode=self.decode,
        attention_impl=cfg.attention_impl,
        name="self_attention")(y, y, mask, deterministic=deterministic, positions=positions)
    x = _constrain(x + _dropout(cfg)(y, deterministic=deterministic))
    y = norm("pre_mlp_layer_norm")(x)
    y = layers.MlpBlock(intermediate_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
                        intermediate_dropout_rate=cfg.dropout_rate, dtype=cfg.jnp_dtype,
                        name="mlp")(y, deterministic=deterministic)
    x = _constrain(x + _dropout(cfg)(y, deterministic=deterministic))
    return (x, None) if self.scanned else x


class DecoderStack(nn.Module):
  """The layers, final norm and output layer (the `decoder/` subtree)."""
  config: DecoderConfig
  shared_embedding: layers.Embed

  @nn.compact
  def __call__(self, tokens: Array, mask: Array | masks.StructuredMask,
               positions: Array | None, deterministic: bool, decode: bool) -> Array:
    """tokens: int [b, l]; mask: bool [b, 1, l, l]; positions: int [b, l] or None
    -> float32 logits [b, l, vocab]."""
    cfg = self.config
    x = _dropout(cfg)(self.shared_embedding(tokens), deterministic=deterministic)
    x = _constrain(x)
    x = layers.run_stack(DecoderLayer, cfg.num_layers, x, mask, positions,
                         scan=cfg.scan_layers, remat=cfg.remat_policy, config=cfg,
                         deterministic=deterministic, decode=decode)
    x = layers.RMSNorm(epsilon=cfg.norm_epsilon, dtype=cfg.jnp_dtype, name="decoder_norm")(x)
    x = _dropout(cfg)(x, deterministic=deterministic)
    if cfg.tie_embeddings:
      logits = self.shared_embedding.attend(x)
    else:
      logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.jnp_dtype,
                            name="logits_dense")(x)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)


class Transformer(nn.Module):
  """The decoder-only network (T5X DecoderOnly features, Llama architecture).

  `__call__(decoder_input_tokens [b, l], decoder_target_tokens [b, l],
  decoder_segment_ids=None, decoder_positions=None,
  decoder_causal_attention=None, deterministic=True, decode=False)` returns
  float32 logits `[b, l, vocab]`.

  Training / scoring (`decode=False`): id 0 is padding (and the BOS of the
  shifted input), so real positions are `decoder_target_tokens > 0`; the mask
  is `masks.decoder_mask` (causal; bidirectional among positions where
  `decoder_causal_attention` is 1; within `decoder_segment_ids` when packed).
  `decoder_positions` feed RoPE (default 0..l-1); packed batches must pass
  them, restarting at 0 per segment.

  Decoding (`decode=True`, the `cache` collection mutable): the tokens are the
  next `n` tokens of every row, written to the KV cache (see
  `layers.MultiHeadAttention`); `decoder_target_tokens` and
  `decoder_segment_ids` are ignored; the new tokens attend causally to each
  other (bidirectionally among those with `decoder_causal_attention` = 1, for
  a prefix-LM prefill) and to every earlier cached token; positions default
  to the cache slots.
  """
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.jnp_dtype)
    self.decoder = DecoderStack(cfg, self.token_embedder)

  def __call__(self, decoder_input_tokens: Array, decoder_target_tokens: Array | None,
               decoder_segment_ids: Array | None = None,
               decoder_positions: Array | None = None,
               decoder_causal_attention: Array | None = None, deterministic: bool = True,
               decode: bool = False, decode_mask: Array | None = None) -> Array:
    mask: Array | masks.StructuredMask
    if decode and decode_mask is not None:
      mask = decode_mask
    elif decode:
      valid = jnp.ones(decoder_input_tokens.shape, jnp.bool_)
      mask = masks.decoder_mask(valid, decoder_causal_attention)
    elif decoder_target_tokens is None:
      raise ValueError("decoder_target_tokens is required unless decode=True")
    elif decoder_causal_attention is None and masks.wants_structured_mask(
        self.config.attention_impl):
      mask = masks.StructuredMask(decoder_target_tokens > 0, decoder_segment_ids, causal=True)
    else:
      mask = masks.decoder_mask(decoder_target_tokens > 0, decoder_causal_attention,
                                 decoder_segment_ids)
    if not decode and decoder_positions is None:
      decoder_positions = jnp.arange(decoder_input_tokens.shape[-1], dtype=jnp.int32)[None]
    return self.decoder(decoder_input_tokens, mask, decoder_positions, deterministic, decode)


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unscanned parameters (`decoder/layers_<i>`) -> scanned (`decoder/layers`)."""
  return {**params, "decoder": layers.stack_layer_params(params["decoder"], num_layers)}


def unstack_layers(params: dict) -> dict:
  """Scanned parameters (`decoder/layers`) -> unscanned (`decoder/layers_<i>`)."""
  return {**params, "decoder": layers.unstack_layer_params(params["decoder"])}


class DecoderOnlyModel(base.TokenModel):
  """Loss, metrics and cached decoding of a decoder-only network (`Transformer`).

  Batches use T5X's decoder-only feature names, all `[batch, length]`:
  decoder_input_tokens, decoder_target_tokens, decoder_loss_weights, and
  optionally decoder_segment_ids + decoder_positions (packing) and
  decoder_causal_attention (prefix LM).

  Args:
    network: a Flax module called as `network(decoder_input_tokens,
      decoder_target_tokens, decoder_segment_ids=None, decoder_positions=None,
      decoder_causal_attention=None, deterministic=..., decode=...)` that
      returns logits `[batch, length, vocab]`, with `network.config.vocab_size`.
    vocabulary, z_loss, label_smoothing: see `base.TokenModel` (the loss
      weights `decoder_loss_weights` are 0 on padding and on a prefix LM's inputs).

  Decoding: `cache = model.init_cache(batch_size, max_length)`, then
  `logits, cache = model.decode_step(params, cache, tokens)` for a prefill of
  several tokens and then one token at a time; the logits at a position
  equal `model.logits` at that position of the whole sequence.
  """

  feature_names = INPUT_FEATURES
  #: The feature converter (`t5xlike.data.feature_converters.CONVERTERS`) that makes its batches.
  feature_converter = "decoder"

  def init(self, rng: Array, batch: Batch) -> Any:
    """Returns the (logically boxed) variables for a batch of these shapes."""
    return self.network.init(rng, batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                             deterministic=True)

  def logits(self, params: Any, batch: Batch, dropout_rng: Array | None = None) -> Array:
    """float32 logits [batch, length, vocab]; dropout on when a rng is given."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    # `apply` without `mutable` returns the network's output alone.
    return cast(Array, self.network.apply(
        {"params": params}, batch["decoder_input_tokens"], batch["decoder_target_tokens"],
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        decoder_positions=batch.get("decoder_positions"),
        decoder_causal_attention=batch.get("decoder_causal_attention"),
        deterministic=dropout_rng is None, rngs=rngs))

  def pooled_states(self, params: Any, batch: Batch) -> Array:
    """float32 [b, embed]: the last layer's states (after `decoder_norm`) averaged
    over the row's tokens (`decoder_target_tokens > 0`: a prefix LM's inputs and
    its targets).

    Runs `logits` with `decoder_norm`'s output captured (tied or untied output
    layer alike); the logits are not returned, so XLA drops them.
    """
    captured: list[Array] = []

    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      if (isinstance(module, layers.RMSNorm) and module.name == "decoder_norm"
          and context.method_name == "__call__"):
        captured.append(out)
      return out

    with nn.intercept_methods(intercept):
      self.logits(params, batch)
    if len(captured) != 1:  # A network without one `decoder_norm` (not this model's).
      raise ValueError(f"expected one decoder_norm, found {len(captured)}")
    return base.mean_over_tokens(captured[0], jnp.asarray(batch["decoder_target_tokens"]) > 0)

  def init_cache(self, batch_size: int, max_length: int) -> Any:
    """An empty KV cache (the `cache` collection) for `max_length` tokens per row.

    Per attention layer `decoder/layers_<i>/self_attention`: `cached_key`,
    `cached_value` zeros [batch_size, max_length, num_kv_heads, head_dim] in
    the activation dtype and `cache_index` 0 (int32 scalar); with
    `scan_layers` one `decoder/layers/self_attention` whose arrays have a
    leading `num_layers` axis.
    """
    tokens = jnp.zeros((batch_size, max_length), jnp.int32)
    shapes = jax.eval_shape(
        lambda: self.network.init(jax.random.key(0), tokens, None, decode=True))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def decode_step(self, params: Any, cache: Any, tokens: Array, positions: Array | None = None,
                  causal_attention: Array | None = None,
                  mask: Array | None = None) -> tuple[Array, Any]:
    """Feeds the next tokens of every row through the cache.

    Args:
      params: the network's parameters.
      cache: from `init_cache` or the previous `decode_step`.
      tokens: int [batch, n], the decoder *input* tokens at the next n
        positions (the first is 0, the BOS); n > 1 is a prefill.
      positions: int [batch, n] RoPE positions; default the cache slots
        cache_index .. cache_index + n - 1.
      causal_attention: optional int [batch, n], 1 on prefix positions that
        see each other bidirectionally (prefix-LM prefill).
      mask: optional bool [batch, 1, n, max_length], which cache slots each new
        token sees (absolute; replaces the causal / prefix mask of the chunk),
        e.g. to hide the padding of left-padded prompts.
    Returns:
      (float32 logits [batch, n, vocab], the updated cache).
    """
    logits, variables = self.network.apply(
        {"params": params, "cache": cache}, tokens, None, decoder_positions=positions,
        decoder_causal_attention=causal_attention, decode=True, decode_mask=mask,
        mutable=["cache"])
    return logits, variables["cache"]

  # -- decoding protocol of `t5xlike.inference.decoding` (see base.TokenModel.predict_batch) --
  def decoding_start(self, params: Any, batch: Batch, max_length: int) -> tuple[Any, Array]:
    """Reads each row's prompt and returns (state, logits [b, vocab] of the first token).

    The prompt is what the decoder feature converter puts before the
    targets: with `decoder_causal_attention` (prefix LM) the positions where
    it is 1 (the BOS 0 and the inputs), which see each other bidirectionally
    as in training; without it the BOS alone (causal LM). Prompts are left-
    padded to the batch's width P in a cache of P + max_length + 1 slots;
    padded slots are hidden and RoPE positions count from each row's first
    real token, so every row is decoded as if alone.
    """
    tokens = jnp.asarray(batch["decoder_input_tokens"], jnp.int32)
    rows = tokens.shape[0]
    prompt_width, prompt_len = self._prompt_lengths(batch)
    index = jnp.arange(prompt_width, dtype=jnp.int32)[None] - (prompt_width - prompt_len)[:, None]
    valid = index >= 0
    prompt = jnp.where(valid, jnp.take_along_axis(tokens, jnp.maximum(index, 0), axis=1), 0)
    slots = prompt_width + max_length + 1
    slot_valid = self._slot_valid(valid, slots)
    mask = valid[:, None, :, None] & slot_valid[:, None, None, :]
    mask = mask & (jnp.arange(slots)[None, None, None, :] < prompt_width)
    logits, cache = self.decode_step(params, self.init_cache(rows, slots), prompt,
                                     positions=jnp.maximum(index, 0), mask=mask)
    state = {"cache": cache, "slot_valid": slot_valid, "next_position": prompt_len}
    return state, logits[:, -1]

  @staticmethod
  def _prompt_lengths(batch: Mapping[str, Any]) -> tuple[int, Array]:
    """(P, the padded prompt width; int32 [b] each row's prompt length), see `decoding_start`."""
    rows, width = batch["decoder_input_tokens"].shape
    prefix = batch.get("decoder_causal_attention")
    if prefix is None:
      return 1, jnp.ones((rows,), jnp.int32)
    return width, jnp.sum(jnp.asarray(prefix) > 0, axis=1).astype(jnp.int32)

  @staticmethod
  def _slot_valid(prompt_valid: Array, slots: int) -> Array:
    """bool [b, slots]: the real prompt slots of [b, P] then every later slot."""
    rows, width = prompt_valid.shape
    return jnp.concatenate([prompt_valid, jnp.ones((rows, slots - width), jnp.bool_)], 1)

  def prompt_layout(self, batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """(int [b] each row's prompt length, P the padded prompt width) of a host (NumPy)
    batch: what `decoding_start` reads, for packing the prompts before the call."""
    width, lengths = self._prompt_lengths(batch)
    return np.asarray(lengths), width

  def prepacked_decoding_start(self, params: Any, batch: Batch,
                               packing: prepacking.PackedPrompts,
                               max_length: int) -> tuple[Any, Array]:
    """`decoding_start` with the prompts prefilled packed (`inference.prepacking`).

    The prompts (`prompt_layout`) are laid into packing's R rows of C slots, run
    through a fresh [R, C] cache with a block-diagonal mask (each prompt sees
    itself, bidirectionally, as in `decoding_start`) and restarted RoPE positions;
    the keys and values of each prompt are then unpacked into its own row of a
    cache laid out as `decoding_start`'s (left-padded to P, P + max_length + 1
    slots) and the logits of its last token are the first logits. The returned
    state is that of `decoding_start` (the same values up to float rounding).
    """
    tokens = jnp.asarray(batch["decoder_input_tokens"], jnp.int32)
    prompt_width, prompt_len = self._prompt_lengths(batch)
    packed = prepacking.gather_packed(tokens, packing)
    logits, cache = self.decode_step(
        params, self.init_cache(*packed.shape), packed, positions=jnp.asarray(packing.positions),
        mask=prepacking.block_diagonal_mask(packing))
    slots = prompt_width + max_length + 1
    cache = prepacking.unpack_cache(cache, packing, prompt_width, slots,
                                    self.network.config.scan_layers)
    index = jnp.arange(prompt_width, dtype=jnp.int32)[None] - (prompt_width - prompt_len)[:, None]
    state = {"cache": cache, "slot_valid": self._slot_valid(index >= 0, slots),
             "next_position": prompt_len}
    return state, prepacking.last_token(logits, packing)

  def decoding_step(self, params: Any, tokens: Array, state: Any) -> tuple[Array, Any]:
    """Feeds tokens int [b, 1]; returns (logits [b, vocab], state)."""
    logits, cache = self.decode_step(
        params, state["cache"], tokens, positions=state["next_position"][:, None],
        mask=state["slot_valid"][:, None, None, :])
    return logits[:, 0], {**state, "cache": cache, "next_position": state["next_position"] + 1}

  def gather_decoding_rows(self, state: Any, rows: Array) -> Any:
    """The decoding state of rows `rows` (int [m])."""
    take = lambda x: jnp.take(x, rows, axis=0)
    cache = layers.gather_cache_rows(state["cache"], rows, self.network.config.scan_layers)
    return {"cache": cache,
            "slot_valid": take(state["slot_valid"]), "next_position": take(state["next_position"])}

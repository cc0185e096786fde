"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning", arXiv:2104.08691).

`length` learnt vectors (`prompt: [length, embed]`, logical axes
`prompt_length`, `embed`) are prepended to the embedded input of the
encoder (T5: parameter 'encoder/prompt') or of the decoder-only stack
('decoder/prompt'); every layer attends to them. TASK_FEATURE_LENGTHS stay
the user's: the model runs on `length` more positions and gives back its
usual outputs.

T5 (`t5.Encoder`, `t5.Decoder`): the encoder runs on [prompt; tokens]
(relative position biases over the longer input: the prompt at positions
0..n-1, the tokens after it); the prompt slots see each other and every
real token, real tokens see the prompt; the decoder's cross-attention sees
the prompt slots from every real target position. Packed encoder inputs
(`encoder_segment_ids`) are refused (the prompt slots would join segments).

Decoder-only (`decoder.DecoderStack`): the stack runs on [prompt; tokens]
with RoPE positions 0..n-1 for the prompt and the tokens' positions + n
(relative positions among the tokens unchanged; packed segments each see
the prompt at the same distance); real tokens see every prompt slot (a
causal or prefix LM alike), prompt slot i sees prompt slots 0..i only (as
tokens before the input would: the model on [prompt; x] equals the base
model on [e; x] when the prompt is the embeddings of tokens e); the logits of
the prompt slots are dropped, so logits, targets and loss weights keep
their layout and the loss never counts a prompt slot. Cached decoding of a
decoder-only model with a prompt is not supported (ValueError).

Length and initialisation: the defaults follow the reference's released prompts
(google-research/prompt-tuning `prompt_tuning/pretrained_prompts/
t5_1_1_lm100k_base/README.md`: length 100, "Class Label Init"; its
`configs/models/t5_1_1_prompt.gin` also sets PROMPT_LENGTH = 100). The paper's
ablation (Lester et al. 2021, Section 3.2 and Figure 3(b)) finds class-label
initialisation best, with the gaps between initialisations closing at XXL size.
When the run starts from INITIAL_CHECKPOINT_PATH, `initialize` sets the prompt
from the checkpoint's embedding table:
- `init='class_labels'` (the reference's `prompts.from_embedded_list` over
  `prompts.from_sample_of_embeddings`): row i < m is the mean embedding of the
  token ids of class label i (`class_label_ids`, e.g. from
  `label_token_ids(['positive', 'negative'], vocabulary)`: the verbalizers'
  pieces, no EOS), the other rows as 'vocab';
- `init='vocab'` (the default when a task has no fixed label set, e.g. the
  multitask mixture): the embedding rows of `length` distinct token ids drawn
  by `np.random.default_rng(seed)` from `[vocab_low, vocab_high)` (the
  reference samples `population_size` = 5,000 rows from id 0; SentencePiece ids
  run roughly from frequent to rare; ids 0-2, padding, EOS and UNK, are left
  out here);
- `init='uniform'`: U(-0.5, 0.5) (the paper's random init, also the starting
  value before `initialize`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5xlike.finetuning import peft, peft_registry, selection
from t5xlike.models import decoder, layers, t5

PARAM = "prompt"
EMBEDDING = ("token_embedder", "embedding")
INITS = ("vocab", "class_labels", "uniform")


def uniform_init(key, shape, dtype=jnp.float32):
  return jax.random.uniform(key, shape, dtype, -0.5, 0.5)


def extend_mask(mask: jax.Array, n: int, bidirectional: bool) -> jax.Array:
  """bool [b, h, q, k] -> [b, h, n + q, n + k] with n prompt slots in front.

  A real query row (one that sees any key) sees every prompt slot.
  `bidirectional` (an encoder): prompt slots see each other and the real keys
  (columns any row sees); else (a causal decoder) prompt slot i sees prompt
  slots 0..i only, as if they were tokens before the input."""
  mask = mask.astype(jnp.bool_)
  b, h, q, k = mask.shape
  row_valid = jnp.any(mask, axis=-1, keepdims=True)
  to_prompt = jnp.broadcast_to(row_valid, (b, h, q, n))
  if bidirectional:
    from_prompt = jnp.broadcast_to(jnp.any(mask, axis=-2, keepdims=True), (b, h, n, k))
    among = jnp.ones((b, h, n, n), jnp.bool_)
  else:
    from_prompt = jnp.zeros((b, h, n, k), jnp.bool_)
    among = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), jnp.bool_)), (b, h, n, n))
  top = jnp.concatenate([among, from_prompt], axis=-1)
  return jnp.concatenate([top, jnp.concatenate([to_prompt, mask], axis=-1)], axis=-2)


def extend_cross_mask(mask: jax.Array, n: int) -> jax.Array:
  """Cross-attention mask bool [b, h, q, k] -> [b, h, q, n + k]: real query rows
  see the n prompt slots of the encoder output."""
  mask = mask.astype(jnp.bool_)
  row_valid = jnp.any(mask, axis=-1, keepdims=True)
  return jnp.concatenate([jnp.broadcast_to(row_valid, mask.shape[:3] + (n,)), mask], axis=-1)


def _arg(args, kwargs, index: int, name: str, default=None):
  return args[index] if len(args) > index else kwargs.get(name, default)


def _replace(args, kwargs, index: int, name: str, value):
  if len(args) > index:
    return args[:index] + (value,) + args[index + 1:], kwargs
  return args, {**kwargs, name: value}


@peft_registry.register
@dataclasses.dataclass(frozen=True)
class PromptTuning(peft.PeftMethod):
  """`length` soft prompt vectors before the encoder / decoder-only input.

  Attributes:
    length: n, the number of prompt vectors (the reference's 100).
    init: 'vocab' (embedding rows of random token ids), 'class_labels' (the class
      labels' mean embeddings first, then as 'vocab') or 'uniform' (module doc).
    seed: seeds the token ids of 'vocab' and 'class_labels'.
    vocab_low, vocab_high: the ids are drawn from [vocab_low, vocab_high)
      (vocab_high clipped to the embedding's rows).
    also_train: further parameter groups trained (`selection.GroupSpec`s).
    class_label_ids: per class label its token ids (`label_token_ids`), for
      `init='class_labels'`; at most `length` labels.
  """
  length: int = 100
  init: str = "vocab"
  seed: int = 0
  vocab_low: int = 3
  vocab_high: int = 5000
  also_train: Sequence[selection.GroupSpec] = ()
  class_label_ids: Sequence[Sequence[int]] = ()
  #: The prompt is prepended to each input row: a row must hold one input, so
  #: `inference.predictor` runs the prefill unpacked (no prepacking).
  prepends_prompt: ClassVar[bool] = True

  param_pattern = rf"^(encoder|decoder)/{PARAM}$"

  def __post_init__(self):
    peft.check_positive(self, "length")
    if self.init not in INITS:
      raise ValueError(f"PromptTuning.init must be one of {INITS}, got {self.init!r}")
    labels = tuple(tuple(int(i) for i in ids) for ids in self.class_label_ids)
    object.__setattr__(self, "class_label_ids", labels)  # Gin binds lists.
    if self.init == "class_labels" and not labels:
      raise ValueError("PromptTuning(init='class_labels') needs class_label_ids "
                       "(PROMPT_CLASS_LABELS)")
    if len(labels) > self.length or any(not ids for ids in labels):
      raise ValueError(f"PromptTuning: {len(labels)} class label(s) for {self.length} prompt "
                       f"vectors, each with at least one token id (got {labels})")
    if not 0 <= self.vocab_low < self.vocab_high:
      raise ValueError(f"PromptTuning needs 0 <= vocab_low < vocab_high, got "
                       f"{self.vocab_low}, {self.vocab_high}")
    peft.as_tuple(self, "also_train")

  def _prompt(self, module: nn.Module, features: int) -> jax.Array:
    return layers.logical_param(module, PARAM, uniform_init, ("prompt_length", "embed"),
                                (self.length, features), jnp.float32)

  def interceptor(self):
    n = self.length
    # The prompt and the offset of the tokens' embeddings (None, or [b, l, embed]: DePT),
    # until the stack's input embedding takes them.
    pending: list[tuple[jax.Array, jax.Array | None]] = []

    def run_on_extended_tokens(next_fun, args, kwargs, module, token_index, features,
                               positions=None):
      """Runs the stack on [n placeholder ids; tokens]; its `layers.Embed` call then
      swaps the placeholders' embeddings for the prompt (the `pending` one) and adds
      `token_offset` to the tokens' embeddings.

      Args:
        next_fun, args, kwargs: the intercepted call.
        module: the stack (`t5.Encoder`, `decoder.DecoderStack`): owns the prompt parameter.
        token_index: the position of `tokens` (int [b, l]) among the call's arguments.
        features: the embedding width (the prompt is [n, features]).
        positions: int [b, l], the tokens' positions (None: 0..l-1 in every row).
      """
      tokens = _arg(args, kwargs, token_index, "tokens")
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32),
                                     tokens.shape)
      pending.append((self._prompt(module, features),
                      self.token_offset(module, positions, features)))
      extended = jnp.concatenate([jnp.zeros(tokens.shape[:-1] + (n,), tokens.dtype), tokens],
                                 axis=-1)
      args, kwargs = _replace(args, kwargs, token_index, "tokens", extended)
      try:
        return next_fun(*args, **kwargs)
      finally:
        pending.clear()

    def intercept(next_fun, args, kwargs, context):
      module, method = context.module, context.method_name
      if method == "encode" and isinstance(module, t5.Transformer):
        if _arg(args, kwargs, 1, "encoder_segment_ids") is not None:
          raise ValueError("prompt tuning does not support packed encoder inputs "
                           "(encoder_segment_ids): set pack=False")
      elif method == "__call__" and isinstance(module, t5.Encoder):
        mask = extend_mask(_arg(args, kwargs, 1, "mask"), n, bidirectional=True)
        args, kwargs = _replace(args, kwargs, 1, "mask", mask)
        return run_on_extended_tokens(next_fun, args, kwargs, module, 0, module.config.emb_dim)
      elif method == "__call__" and isinstance(module, t5.Decoder):
        encoded, cross = _arg(args, kwargs, 0, "encoded"), _arg(args, kwargs, 3, "cross_mask")
        if encoded.shape[-2] == cross.shape[-1] + n:
          args, kwargs = _replace(args, kwargs, 3, "cross_mask", extend_cross_mask(cross, n))
      elif method == "__call__" and isinstance(module, decoder.DecoderStack):
        if _arg(args, kwargs, 4, "decode", False):
          # Which call is the prefill (the one to write the prompt into the cache) is
          # known only at run time inside jit-compiled decoding loops.
          raise ValueError("prompt tuning: cached decoding of a decoder-only model is not "
                           "supported (score the targets instead)")
        mask = extend_mask(_arg(args, kwargs, 1, "mask"), n, bidirectional=False)
        token_positions = _arg(args, kwargs, 2, "positions")
        prompt_positions = jnp.broadcast_to(jnp.arange(n, dtype=token_positions.dtype)[None],
                                            (token_positions.shape[0], n))
        positions = jnp.concatenate([prompt_positions, token_positions + n], axis=-1)
        args, kwargs = _replace(args, kwargs, 1, "mask", mask)
        args, kwargs = _replace(args, kwargs, 2, "positions", positions)
        logits = run_on_extended_tokens(next_fun, args, kwargs, module, 0,
                                        module.config.emb_dim, token_positions)
        return logits[:, n:]
      elif method == "__call__" and isinstance(module, layers.Embed) and pending:
        embedded = next_fun(*args, **kwargs)
        prompt, offset = pending.pop()
        prompt = jnp.broadcast_to(prompt.astype(embedded.dtype)[None],
                                  embedded.shape[:1] + prompt.shape)
        tokens = embedded[:, n:]
        if offset is not None:
          tokens = tokens + offset.astype(embedded.dtype)
        return jnp.concatenate([prompt, tokens], axis=1)
      return next_fun(*args, **kwargs)
    return intercept

  def token_offset(self, module: nn.Module, positions: jax.Array,
                   features: int) -> jax.Array | None:
    """What is added to the embeddings of the real tokens (int positions [b, l] ->
    [b, l, features]), its parameters created on the stack `module`; None: nothing
    (prompt tuning; DePT adds its low-rank update)."""
    del module, positions, features
    return None

  def token_ids(self, rows: int) -> np.ndarray:
    """The `length` token ids whose embeddings initialise the prompt (`init='vocab'`)."""
    high = min(self.vocab_high, rows)
    if high <= self.vocab_low:
      raise ValueError(f"PromptTuning: no token ids in [{self.vocab_low}, {high})")
    choices = np.arange(self.vocab_low, high)
    return np.random.default_rng(self.seed).choice(choices, self.length,
                                                   replace=self.length > choices.size)

  def initial_prompt(self, table: jax.Array) -> jax.Array:
    """[length, embed] from an embedding table [vocab, embed] (`init` 'vocab' or
    'class_labels'): sampled rows, then the class labels' mean embeddings in rows
    0..m-1 (float32 means)."""
    prompt = jnp.take(table, jnp.asarray(self.token_ids(table.shape[0])), axis=0)
    if self.init == "class_labels":
      means = [jnp.mean(jnp.take(table, jnp.asarray(ids), axis=0).astype(jnp.float32), axis=0)
               for ids in self.class_label_ids]
      prompt = prompt.at[:len(means)].set(jnp.stack(means).astype(prompt.dtype))
    return prompt

  def initialize(self, params: Any, fresh, restored):
    """Sets each prompt that did not come from the checkpoint (a prompt-tuning run's own
    checkpoint holds its trained prompt: kept) to `initial_prompt`."""
    del fresh
    if self.init == "uniform":
      return params
    prompt = self.initial_prompt(params[EMBEDDING[0]][EMBEDDING[1]])
    out = dict(params)
    for stack in ("encoder", "decoder"):
      if (isinstance(params.get(stack), dict) and PARAM in params[stack]
          and f"{stack}/{PARAM}" not in restored):
        old = params[stack][PARAM]
        out[stack] = {**params[stack], PARAM: prompt.astype(old.dtype)}
    return out

  def describe(self, params):
    lines = super().describe(params)
    if self.init == "class_labels":
      lines.append(f"  prompt rows 0..{len(self.class_label_ids) - 1} initialised from the "
                   f"class labels' mean embeddings, token ids {list(self.class_label_ids)}")
    if self.init != "uniform":
      lines.append(f"  prompt initialised from the embeddings of token ids drawn with seed "
                   f"{self.seed} from [{self.vocab_low}, {self.vocab_high})")
    return lines


def label_token_ids(labels: Sequence[str], vocabulary: Any) -> tuple[tuple[int, ...], ...]:
  """Each class label's token ids (`vocabulary.encode`, no EOS): `class_label_ids` for
  `init='class_labels'`. Gin: `class_label_ids = @prompt_tuning.label_token_ids()`
  with `labels = %PROMPT_CLASS_LABELS`, `vocabulary = %VOCABULARY`."""
  out = tuple(tuple(int(i) for i in vocabulary.encode(label)) for label in labels)
  empty = [label for label, ids in zip(labels, out) if not ids]
  if empty:
    raise ValueError(f"class label {empty[0]!r} encodes to no token")
  return out

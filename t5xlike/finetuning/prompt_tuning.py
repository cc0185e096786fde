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

Initialisation: `init='vocab'` (the paper's best): when the run starts from
INITIAL_CHECKPOINT_PATH, `initialize` sets the prompt to the checkpoint's
embedding rows of `length` distinct token ids drawn by
`np.random.default_rng(seed)` from `[vocab_low, vocab_high)` (SentencePiece
ids run roughly from frequent to rare; the paper samples the 5,000 most
common tokens); `init='uniform'`: U(-0.5, 0.5) (the paper's random init,
also the starting value before `initialize`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5xlike.finetuning import peft, peft_registry, selection
from t5xlike.models import decoder, layers, t5

PARAM = "prompt"
EMBEDDING = ("token_embedder", "embedding")


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
    length: n, the number of prompt vectors.
    init: 'vocab' (embedding rows of random token ids, see module doc) or 'uniform'.
    seed: seeds the token ids of `init='vocab'`.
    vocab_low, vocab_high: the ids are drawn from [vocab_low, vocab_high)
      (vocab_high clipped to the embedding's rows).
    also_train: further parameter groups trained (`selection.GroupSpec`s).
  """
  length: int = 20
  init: str = "vocab"
  seed: int = 0
  vocab_low: int = 3
  vocab_high: int = 5000
  also_train: Sequence[selection.GroupSpec] = ()

  param_pattern = rf"^(encoder|decoder)/{PARAM}$"

  def __post_init__(self):
    peft.check_positive(self, "length")
    if self.init not in ("vocab", "uniform"):
      raise ValueError(f"PromptTuning.init must be 'vocab' or 'uniform', got {self.init!r}")
    if not 0 <= self.vocab_low < self.vocab_high:
      raise ValueError(f"PromptTuning needs 0 <= vocab_low < vocab_high, got "
                       f"{self.vocab_low}, {self.vocab_high}")
    peft.as_tuple(self, "also_train")

  def _prompt(self, module: nn.Module, features: int) -> jax.Array:
    return layers.logical_param(module, PARAM, uniform_init, ("prompt_length", "embed"),
                                (self.length, features), jnp.float32)

  def interceptor(self):
    n = self.length
    pending: list[jax.Array] = []  # The prompt, until the stack's input embedding takes it.

    def run_on_extended_tokens(next_fun, args, kwargs, module, token_index, features):
      """Runs the stack on [n placeholder ids; tokens]; its `layers.Embed` call then
      swaps the placeholders' embeddings for the prompt (the `pending` one).

      Args:
        next_fun, args, kwargs: the intercepted call.
        module: the stack (`t5.Encoder`, `decoder.DecoderStack`): owns the prompt parameter.
        token_index: the position of `tokens` (int [b, l]) among the call's arguments.
        features: the embedding width (the prompt is [n, features]).
      """
      tokens = _arg(args, kwargs, token_index, "tokens")
      pending.append(self._prompt(module, features))
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
        positions = _arg(args, kwargs, 2, "positions")
        prompt_positions = jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype)[None],
                                            (positions.shape[0], n))
        positions = jnp.concatenate([prompt_positions, positions + n], axis=-1)
        args, kwargs = _replace(args, kwargs, 1, "mask", mask)
        args, kwargs = _replace(args, kwargs, 2, "positions", positions)
        logits = run_on_extended_tokens(next_fun, args, kwargs, module, 0,
                                        module.config.emb_dim)
        return logits[:, n:]
      elif method == "__call__" and isinstance(module, layers.Embed) and pending:
        embedded = next_fun(*args, **kwargs)
        prompt = pending.pop().astype(embedded.dtype)
        prompt = jnp.broadcast_to(prompt[None], embedded.shape[:1] + prompt.shape)
        return jnp.concatenate([prompt, embedded[:, n:]], axis=1)
      return next_fun(*args, **kwargs)
    return intercept

  def token_ids(self, rows: int) -> np.ndarray:
    """The `length` token ids whose embeddings initialise the prompt (`init='vocab'`)."""
    high = min(self.vocab_high, rows)
    if high <= self.vocab_low:
      raise ValueError(f"PromptTuning: no token ids in [{self.vocab_low}, {high})")
    choices = np.arange(self.vocab_low, high)
    return np.random.default_rng(self.seed).choice(choices, self.length,
                                                   replace=self.length > choices.size)

  def initialize(self, params: Any, fresh):
    del fresh
    if self.init != "vocab":
      return params
    table = params[EMBEDDING[0]][EMBEDDING[1]]
    rows = jnp.asarray(self.token_ids(table.shape[0]))
    out = dict(params)
    for stack in ("encoder", "decoder"):
      if isinstance(params.get(stack), dict) and PARAM in params[stack]:
        old = params[stack][PARAM]
        out[stack] = {**params[stack], PARAM: jnp.take(table, rows, axis=0).astype(old.dtype)}
    return out

  def describe(self, params):
    lines = super().describe(params)
    if self.init == "vocab":
      lines.append(f"  prompt initialised from the embeddings of token ids drawn with seed "
                   f"{self.seed} from [{self.vocab_low}, {self.vocab_high})")
    return lines

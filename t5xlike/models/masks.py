"""Attention masks: which (query, key) pairs may attend, as [b, 1, q, k] booleans
(padding, causal, packed segments, prefix LM), or by structure
(`StructuredMask`) for kernels that mask by causal flag and segment ids.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from t5xlike.models import attention

Array = jax.Array


def attention_mask(query_valid: Array, key_valid: Array) -> Array:
  """[batch, q] and [batch, k] booleans -> mask [batch, 1, q, k]."""
  return (query_valid[:, None, :, None] & key_valid[:, None, None, :])


def causal_mask(length: int) -> Array:
  """Lower-triangular mask [1, 1, length, length]: query i sees keys <= i."""
  return jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))[None, None]


def segment_mask(query_segments: Array, key_segments: Array) -> Array:
  """Packed examples attend within their own segment: [batch, 1, q, k]."""
  return query_segments[:, None, :, None] == key_segments[:, None, None, :]


def bidirectional_mask(valid: Array, segment_ids: Array | None = None) -> Array:
  """Encoder self-attention: real positions see real positions of their own packed
  example. valid bool [batch, length]; segment_ids optional int [batch, length]
  -> bool [batch, 1, length, length]."""
  mask = attention_mask(valid, valid)
  if segment_ids is not None:
    mask = mask & segment_mask(segment_ids, segment_ids)
  return mask


def decoder_mask(valid: Array, causal_attention: Array | None = None,
                 segment_ids: Array | None = None) -> Array:
  """Self-attention mask of a decoder-only model (T5X's `make_decoder_mask`).

  allowed(q, k) = (q >= k OR (prefix[q] AND prefix[k])) AND valid[q] AND
  valid[k] AND segment[q] == segment[k], where `prefix = causal_attention > 0`
  (T5X's name: 1 marks the prefix positions, which see each other
  bidirectionally; a prefix LM's inputs as seen through the shifted decoder
  input). See `make_decoder_mask` in google-research/t5x,
  t5x/examples/decoder_only/layers.py.

  Args:
    valid: bool [batch, length], real (non-padding) positions.
    causal_attention: optional int/bool [batch, length], 1 on prefix positions.
    segment_ids: optional int [batch, length] of packed examples.
  Returns:
    bool [batch, 1, length, length].
  """
  allowed = causal_mask(valid.shape[-1])
  if causal_attention is not None:
    prefix = causal_attention > 0
    allowed = allowed | attention_mask(prefix, prefix)
  mask = allowed & attention_mask(valid, valid)
  if segment_ids is not None:
    mask = mask & segment_mask(segment_ids, segment_ids)
  return mask


@struct.dataclass
class StructuredMask:
  """A self-attention mask given by its structure instead of [b, 1, l, l] booleans.

  What a model passes as `mask` to `MultiHeadAttention` when it knows the
  structure, so that the Pallas kernel (`attention.pallas`) masks by causal
  flag and segment ids and no [b, heads, l, l] mask is built; every other
  kernel gets `dense()`, the exact mask the model would otherwise pass.

  Attributes:
    valid: bool [b, l], real (non-padding) positions.
    segment_ids: optional int [b, l] of packed examples.
    causal: query i sees keys <= i (static).
  """
  valid: Array
  segment_ids: Array | None = None
  causal: bool = struct.field(pytree_node=False, default=True)

  def dense(self) -> Array:
    """bool [b, 1, l, l]: `decoder_mask(valid, None, segment_ids)` when causal, else
    `bidirectional_mask(valid, segment_ids)`."""
    if self.causal:
      return decoder_mask(self.valid, None, self.segment_ids)
    return bidirectional_mask(self.valid, self.segment_ids)

  def kernel_segments(self) -> Array:
    """int32 [b, l]: 0 on padding, segment id + 1 elsewhere (1 when unpacked).

    Equal ids exactly where `dense()` allows a (query, key) pair, except
    padding, which sees padding: only rows of padded queries differ, whose
    outputs no real position reads (their keys are hidden from real queries)."""
    ids = (jnp.zeros(self.valid.shape, jnp.int32) if self.segment_ids is None
           else self.segment_ids.astype(jnp.int32))
    return jnp.where(self.valid, ids + 1, 0)


def wants_structured_mask(attention_impl: str) -> bool:
  """Whether a model should pass `StructuredMask`: the Pallas kernel may serve."""
  return attention_impl == "pallas" or (attention_impl == "auto"
                                        and attention.target_platform() == "tpu")

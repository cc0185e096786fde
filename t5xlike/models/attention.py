"""Attention kernels behind `layers.MultiHeadAttention`'s q.k / softmax / .v core.

`attention_impl` (a network config field, so gin selects it, e.g.
`t5.T5Config.attention_impl = 'cudnn'`):
  'einsum'  the reference: `jnp.einsum` logits, additive bias, `where` mask,
            softmax, einsum with the values (bit-identical to the original
            T5 code; the only one with attention dropout);
  'xla'     `jax.nn.dot_product_attention(implementation='xla')`;
  'cudnn'   `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's
            fused (flash) attention on NVIDIA GPUs, with the T5 relative
            position bias as its additive bias and the causal / padding /
            segment masks as its boolean mask;
  'pallas'  reserved for the Pallas TPU flash kernel: not wired yet (it
            needs segment ids and a causal flag instead of a dense mask),
            so it always falls back;
  'auto'    cuDNN on GPUs when the activations are bfloat16/float16, else einsum.
When the requested kernel cannot serve a call (platform, dtype, attention
dropout, a shape cuDNN refuses) the log says so in one line, naming the
reason and the fallback (once per distinct message), and the einsum path runs.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)
Array = jax.Array

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "pallas")
_said: set[str] = set()


def check_name(impl: str) -> None:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {impl!r}")


def _fallback(requested: str, reason: str) -> str:
  message = f"attention_impl={requested!r} cannot serve this attention ({reason}): using 'einsum'"
  if message not in _said:
    _said.add(message)
    log.warning(message)
  return "einsum"


def resolve(requested: str, dtype: jnp.dtype, dropout: bool, decode: bool = False) -> str:
  """The kernel that runs: 'einsum', 'xla' or 'cudnn' (see the module docstring).

  Args:
    requested: the configured `attention_impl`.
    dtype: the activation dtype.
    dropout: attention dropout is active in this call.
    decode: a KV-cache decoding call.
  """
  check_name(requested)
  platform = jax.default_backend()
  if requested == "auto":
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and not (
        dropout or decode):
      return "cudnn"
    return "einsum"
  if requested == "einsum":
    return "einsum"
  if dropout:
    return _fallback(requested, "attention dropout is on")
  if requested == "pallas":
    return _fallback(requested, "the Pallas flash kernel is not wired in this version")
  if requested == "cudnn":
    if platform != "gpu":
      return _fallback(requested, f"cuDNN needs an NVIDIA GPU, this is {platform}")
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      return _fallback(requested, f"cuDNN attention needs bfloat16/float16, got {jnp.dtype(dtype)}")
    if decode:
      return _fallback(requested, "KV-cache decoding")
  return requested


def fused(impl: str, query: Array, key: Array, value: Array, mask: Array | None,
          bias: Array | None, dtype: jnp.dtype) -> Array | None:
  """`jax.nn.dot_product_attention` with scale 1 (T5 folds it into the query).

  query [b, q, heads, d], key/value [b, k, kv_heads, d]; mask bool and bias
  broadcastable to [b, heads, q, k]. Returns [b, q, heads, d] in `dtype`, or
  None (logged) when the kernel refuses the call.
  """
  query, key, value = (x.astype(dtype) for x in (query, key, value))
  four_d = lambda x: x.reshape((1,) * (4 - x.ndim) + x.shape)
  mask = None if mask is None else four_d(mask.astype(jnp.bool_))
  bias = None if bias is None else four_d(bias).astype(dtype if impl == "cudnn" else jnp.float32)
  try:
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=1.0,
                                        implementation=impl).astype(dtype)
  except (ValueError, NotImplementedError, RuntimeError, TypeError) as error:
    _fallback(impl, str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
    return None


def add_bias(logits: Array, bias: Array) -> Array:
  """logits [b, heads, q, k] + bias (broadcastable, e.g. [1, heads, q, k]).

  The same sum as `logits + bias`; the bias gradient over a broadcast batch
  axis is computed as a dot with a vector of ones instead of XLA's
  reduction (on XLA:CPU the reduction of the T5 relative-position-bias
  gradient was a quarter of the t5x_tiny step; the dot takes ~0.6x the
  time of the attention core's backward with it, same values).
  """
  bias = bias.reshape((1,) * (logits.ndim - bias.ndim) + bias.shape).astype(logits.dtype)
  shape = bias.shape

  @jax.custom_vjp
  def add(l, b):
    return l + b

  def forward(l, b):
    return l + b, None

  def backward(_, grad):
    grad_bias = grad
    if shape[0] == 1 and grad.shape[0] > 1:
      ones = jnp.ones((grad.shape[0],), grad.dtype)
      grad_bias = jnp.einsum("b...,b->...", grad, ones)[None]
    axes = tuple(i for i in range(1, grad.ndim) if shape[i] == 1 and grad.shape[i] > 1)
    if axes:
      grad_bias = jnp.sum(grad_bias, axis=axes, keepdims=True)
    return grad, grad_bias

  add.defvjp(forward, backward)
  return add(logits, bias)

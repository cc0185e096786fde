"""Token-level losses and metrics shared by every model.

All functions take float32 `logits: [batch, length, vocab]`, int `targets:
[batch, length]` and float `weights: [batch, length]` (0 for padding) and
return sums over the batch; callers normalise by `weights.sum()` so that the
loss is per target token.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy_with_z_loss(logits: Array, targets: Array, weights: Array,
                              z_loss: float = 1e-4,
                              label_smoothing: float = 0.0) -> tuple[Array, Array]:
  """Weighted sums of (cross entropy + z-loss) and of the z-loss alone.

  Per token, with log_z = logsumexp(logits):
    cross entropy = -sum_v q_v * log_softmax(logits)_v - H(q)
  where q is the one-hot target smoothed to (1 - label_smoothing) on the
  target and label_smoothing / (vocab - 1) elsewhere, and H(q) its entropy
  (so a perfect prediction scores 0, as in T5X); z-loss = z_loss * log_z^2
  (Chowdhery et al. 2022, PaLM §5), which keeps log_z near zero.

  Returns:
    (sum of weights * (cross entropy + z-loss), sum of weights * z-loss), scalars.
  """
  logits = logits.astype(jnp.float32)
  xent, z = token_cross_entropy(logits, jax.nn.logsumexp(logits, axis=-1), targets, z_loss,
                                label_smoothing)
  weights = weights.astype(jnp.float32)
  return jnp.sum((xent + z) * weights), jnp.sum(z * weights)


def token_cross_entropy(logits: Array, log_z: Array, targets: Array, z_loss: float,
                        label_smoothing: float) -> tuple[Array, Array]:
  """Per position, unweighted: (cross entropy, z-loss) of float32 `logits` [..., vocab]
  with `log_z` = logsumexp(logits) [...] given (`cross_entropy_with_z_loss`'s terms)."""
  vocab = logits.shape[-1]
  log_softmax = logits - log_z[..., None]
  target_logprob = jnp.take_along_axis(log_softmax, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    entropy = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    # sum_v q_v log p_v = low * sum_v log p_v + (confidence - low) * log p_target
    soft_logprob = low * jnp.sum(log_softmax, axis=-1) + (confidence - low) * target_logprob
    xent = -soft_logprob - entropy
  else:
    xent = -target_logprob
  return xent, z_loss * jnp.square(log_z)


def correct_count(logits: Array, targets: Array, weights: Array) -> Array:
  """Weighted number of positions whose argmax equals the target.

  Computed as "the target's logit is the maximum" (a max-reduction and a
  gather: XLA:CPU's variadic argmax reduction was 0.4 s per step of a
  32,128-row vocabulary); a position whose maximum is tied between the
  target and another id counts as a hit (argmax would pick the lower id).
  """
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  hits = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  return jnp.sum(hits * weights.astype(jnp.float32))


def token_stats(logits: Array, targets: Array, weights: Array, z_loss: float = 0.0,
                label_smoothing: float = 0.0) -> dict[str, Array]:
  """Summed statistics of a token-level loss: `loss_sum` (cross entropy + z-loss),
  `z_loss_sum`, `correct` (weighted argmax hits) and `weight_sum` (scored tokens).

  Args:
    logits: [batch, length, vocab] (any float dtype; the loss is float32).
    targets: int [batch, length].
    weights: [batch, length], 0 on positions that are not scored.
    z_loss: coefficient of log(Z)^2 (see `cross_entropy_with_z_loss`).
    label_smoothing: target mass spread over the other ids.
  """
  loss_sum, z_sum = cross_entropy_with_z_loss(logits, targets, weights, z_loss=z_loss,
                                              label_smoothing=label_smoothing)
  return {"loss_sum": loss_sum, "z_loss_sum": z_sum,
          "correct": correct_count(logits, targets, weights),
          "weight_sum": jnp.sum(weights.astype(jnp.float32))}


def token_metrics(sums) -> dict:
  """Reported metrics of a token-level model from its summed statistics.

  `sums` holds `loss_sum`, `z_loss_sum`, `correct` and `weight_sum` (scalars,
  jax or Python numbers, summed over batches); returns per-token `loss`,
  `z_loss` and `accuracy`.
  """
  weight = jnp.maximum(sums["weight_sum"], 1.0)
  return {"loss": sums["loss_sum"] / weight, "z_loss": sums["z_loss_sum"] / weight,
          "accuracy": sums["correct"] / weight}


#: Bytes of float32 logits one chunk of `chunked_token_stats` holds (fits a
#: CPU's L3 cache; small next to accelerator memory).
CHUNK_LOGITS_BYTES = 8 * 2 ** 20


def chunked_token_stats(hidden: Array, kernel: Array, targets: Array, weights: Array,
                        dtype: jnp.dtype = jnp.float32, z_loss: float = 0.0,
                        label_smoothing: float = 0.0,
                        chunk_bytes: int | None = None) -> dict[str, Array]:
  """`token_stats` of logits = hidden @ kernel, without the [b, l, vocab] logits.

  The output layer and the loss run in a `lax.scan` over chunks of the
  length axis (the batch axis stays whole, so its sharding is kept), each
  chunk [b, c, vocab] holding about `chunk_bytes` of float32 logits (default:
  `CHUNK_LOGITS_BYTES` or twice the float32 kernel's bytes, whichever is
  larger: every chunk reads the whole kernel, and T5.1.1-small's 66 MB
  kernel read by 15 chunks of 8 positions cost ~1 s of a 10 s CPU step).
  Padding to a multiple of c gets weight 0.

  Differentiated, the same pass also computes the gradient of `loss_sum`
  (a fused linear cross-entropy, `_fused_loss_sum`): per chunk the softmax
  is formed once and d loss_sum / d logits = w * (p * (1 + 2 z_loss log_z)
  - q) (q the smoothed one-hot target) goes straight into the hidden and
  kernel gradients, so the backward pass neither rematerialises the
  logits nor passes over them again. Only `loss_sum` carries a gradient;
  `z_loss_sum`, `correct` and `weight_sum` are reported statistics
  (`lax.stop_gradient`).

  Args:
    hidden: [b, l, embed] input of the output layer.
    kernel: [embed, vocab] the output layer (float32 parameters).
    targets, weights: [b, l].
    dtype: the matmul dtype (the activation dtype), logits float32 as `Dense`.
  Returns:
    the summed statistics of `token_stats`.
  """
  batch, length, _ = hidden.shape
  per_position = batch * kernel.shape[-1] * 4
  # Each chunk reads the whole kernel (three times, differentiated): chunks of at least
  # twice its bytes keep that read below the chunk's own logits traffic.
  budget = (max(CHUNK_LOGITS_BYTES, 2 * kernel.size * 4) if chunk_bytes is None
            else chunk_bytes)
  chunk = int(max(1, min(length, budget // per_position)))
  count = -(-length // chunk)
  pad = count * chunk - length

  def chunks(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((batch, count, chunk) + x.shape[2:]).swapaxes(0, 1)

  loss_sum, others = _fused_loss_sum(chunks(hidden), kernel, chunks(targets),
                                     chunks(weights.astype(jnp.float32)),
                                     jnp.dtype(dtype), float(z_loss), float(label_smoothing))
  return {"loss_sum": loss_sum, **jax.lax.stop_gradient(others)}


def _chunk_logits(h: Array, kernel: Array, dtype: jnp.dtype) -> Array:
  """[b, c, embed] @ [embed, vocab] in `dtype`, float32 logits (as `layers.Dense`)."""
  return jnp.dot(h.astype(dtype), kernel.astype(dtype)).astype(jnp.float32)


def _zero_stats() -> dict[str, Array]:
  return {k: jnp.zeros((), jnp.float32) for k in ("z_loss_sum", "correct", "weight_sum")}


def _chunk_stats(logits: Array, log_z: Array, t: Array, w: Array, z_loss: float,
                 label_smoothing: float) -> tuple[Array, dict[str, Array]]:
  """One chunk's per-position loss [b, c] (cross entropy + z-loss, unweighted) and its
  summed `z_loss_sum` / `correct` / `weight_sum`."""
  xent, z = token_cross_entropy(logits, log_z, t, z_loss, label_smoothing)
  sums = {"z_loss_sum": jnp.sum(z * w), "correct": correct_count(logits, t, w),
          "weight_sum": jnp.sum(w)}
  return xent + z, sums


def _add(total: dict[str, Array], more: dict[str, Array]) -> dict[str, Array]:
  return jax.tree.map(jnp.add, total, more)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_loss_sum(hidden: Array, kernel: Array, targets: Array, weights: Array,
                    dtype: jnp.dtype, z_loss: float,
                    label_smoothing: float) -> tuple[Array, dict[str, Array]]:
  """(loss_sum, the other sums) over chunked inputs: hidden [n, b, c, embed],
  targets / weights [n, b, c]. Undifferentiated: one scan, no gradient work."""

  def body(total, inputs):
    h, t, w = inputs
    logits = _chunk_logits(h, kernel, dtype)
    loss, sums = _chunk_stats(logits, jax.nn.logsumexp(logits, axis=-1), t, w, z_loss,
                              label_smoothing)
    loss_sum, others = total
    return (loss_sum + jnp.sum(loss * w), _add(others, sums)), None

  (loss_sum, others), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), _zero_stats()),
                                       (hidden, targets, weights))
  return loss_sum, others


def _fused_forward(hidden, kernel, targets, weights, dtype, z_loss, label_smoothing):
  """The scan of `_fused_loss_sum` that also forms d loss_sum / d (hidden, kernel,
  weights) per chunk (residuals: [n, b, c, embed], [embed, vocab] float32, [n, b, c])."""
  cast_kernel = kernel.astype(dtype)

  def body(carry, inputs):
    loss_sum, others, grad_kernel = carry
    h, t, w = inputs
    logits = _chunk_logits(h, kernel, dtype)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    loss, sums = _chunk_stats(logits, log_z, t, w, z_loss, label_smoothing)
    probs = jnp.exp(logits - log_z[..., None])
    vocab = logits.shape[-1]
    # d (xent + z) / d logits = p * (1 + 2 z_loss log_z) - q, q the smoothed one-hot.
    low = label_smoothing / (vocab - 1) if label_smoothing else 0.0
    target_mass = (1.0 - label_smoothing) - low
    grad = probs * (1.0 + 2.0 * z_loss * log_z)[..., None] - low
    grad = grad - target_mass * jax.nn.one_hot(t, vocab, dtype=jnp.float32)
    grad = (grad * w[..., None]).astype(dtype)
    grad_h = jnp.dot(grad, cast_kernel.T).astype(h.dtype)
    grad_kernel = grad_kernel + jnp.einsum("bce,bcv->ev", h.astype(dtype), grad,
                                           preferred_element_type=jnp.float32)
    carry = (loss_sum + jnp.sum(loss * w), _add(others, sums), grad_kernel)
    return carry, (grad_h, loss)

  start = (jnp.zeros((), jnp.float32), _zero_stats(), jnp.zeros(kernel.shape, jnp.float32))
  (loss_sum, others, grad_kernel), (grad_hidden, grad_weights) = jax.lax.scan(
      body, start, (hidden, targets, weights))
  return (loss_sum, others), (grad_hidden, grad_kernel.astype(kernel.dtype), grad_weights)


def _fused_backward(dtype, z_loss, label_smoothing, residuals, cotangents):
  del dtype, z_loss, label_smoothing
  grad_hidden, grad_kernel, grad_weights = residuals
  scale = cotangents[0]  # the other sums are stop_gradient'ed by the caller
  return (grad_hidden * scale.astype(grad_hidden.dtype), grad_kernel * scale, None,
          grad_weights * scale)


_fused_loss_sum.defvjp(_fused_forward, _fused_backward)

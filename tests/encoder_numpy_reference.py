"""An independent NumPy float64 implementation of the encoder-only networks
and of the MLM / ELECTRA losses.

Written from BERT (Devlin et al. 2019 §3.1) and ELECTRA (Clark et al. 2020
§2, Appendix A) with this repository's conventions: pre-norm RMS-norm
blocks, ungated tanh-GELU MLP, unscaled dot-product attention (the scaling
is in the query init), learned absolute positions, masks from token id 0;
the MLM head's tied logits are divided by sqrt(embedding width). The
attention / norm / GELU primitives are the T5 reference's. MosaicBERT's
switches (Portes et al. 2023 §2.1): no position table and ALiBi's bias
-m_h |i - j| on every layer's logits (`alibi_bias`, the slopes written from
Press et al. 2022 §3 in closed form), gated GELU MLPs (`wi_0`, `wi_1`).
"""
import math

import numpy as np

from tests.t5_numpy_reference import attention, gelu, mlp as gated_mlp, rms_norm

f64 = lambda x: np.asarray(x, dtype=np.float64)


def mlp(p, x):
  """Ungated MLP ('gelu',): wo(gelu(wi x)); gated ('gelu', 'linear'): wo(gelu(wi_0 x) * wi_1 x)."""
  if "wi" not in p:
    return gated_mlp(p, x)
  return gelu(x @ f64(p["wi"]["kernel"])) @ f64(p["wo"]["kernel"])


def alibi_slopes(heads):
  """ALiBi's slopes in closed form: 2^(-8h/H) for H a power of two; otherwise, with
  P = 2^floor(log2 H), the P slopes 2^(-8h/P) and then 2^(-4(2h - 1)/P), h = 1..H-P
  (the odd-indexed slopes of 2P heads)."""
  power = 2 ** int(math.floor(math.log2(heads)))
  first = [2.0 ** (-8.0 * h / power) for h in range(1, power + 1)]
  return np.array(first + [2.0 ** (-4.0 * (2 * h - 1) / power)
                           for h in range(1, heads - power + 1)])


def alibi_bias(heads, length):
  """float64 [1, heads, length, length]: -slope_h * |i - j|."""
  distance = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :])
  return (-alibi_slopes(heads)[:, None, None] * distance)[None]


def embed(p, tokens, positions=None):
  """tokens [b, l] -> token + position embeddings [b, l, embedding width]."""
  tokens = np.asarray(tokens)
  if "position_embedding" not in p:  # ALiBi: token embeddings alone.
    return f64(p["token_embedder"]["embedding"])[tokens]
  if positions is None:
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return f64(p["token_embedder"]["embedding"])[tokens] + f64(p["position_embedding"])[positions]


def encode(p, x, mask, heads, bias=None):
  """Embeddings [b, l, e] -> hidden [b, l, d] through `p` = params['encoder'];
  `bias` [1, heads, l, l] added to every layer's logits (ALiBi) or None."""
  if "embedding_projection" in p:
    x = x @ f64(p["embedding_projection"]["kernel"])
  num_layers = len([k for k in p if k.startswith("layers_")])
  for i in range(num_layers):
    lp = p[f"layers_{i}"]
    lp64 = {k: {kk: {"kernel": f64(vv["kernel"])} for kk, vv in v.items()}
            if k in ("attention", "mlp") else v for k, v in lp.items()}
    y = rms_norm(x, f64(lp["pre_attention_layer_norm"]["scale"]))
    x = x + attention(lp64["attention"], y, y, mask, bias, heads)
    y = rms_norm(x, f64(lp["pre_mlp_layer_norm"]["scale"]))
    x = x + mlp(lp64["mlp"], y)
  return rms_norm(x, f64(p["encoder_norm"]["scale"]))


def mlm_head(p, hidden, table):
  """hidden [b, l, d] -> logits [b, l, vocab] through the token table [vocab, e]."""
  h = gelu(hidden @ f64(p["dense"]["kernel"]))
  h = rms_norm(h, f64(p["layer_norm"]["scale"]))
  return h @ table.T / np.sqrt(table.shape[1]) + f64(p["output_bias"])


def binary_head(p, hidden):
  """hidden [b, l, d] -> logits [b, l]."""
  return gelu(hidden @ f64(p["dense"]["kernel"])) @ f64(p["logit"]["kernel"])


def attention_mask(tokens, segment_ids=None):
  valid = np.asarray(tokens) > 0
  mask = valid[:, None, :, None] & valid[:, None, None, :]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


def forward(embedder, network, head, tokens, heads, segment_ids=None, positions=None):
  """Logits of an encoder network: `network` holds 'encoder' and 'mlm_head' / 'binary_head'.
  Without a position table in `embedder` the network is ALiBi's."""
  mask = attention_mask(tokens, segment_ids)
  bias = (None if "position_embedding" in embedder
          else alibi_bias(heads, np.asarray(tokens).shape[1]))
  hidden = encode(network["encoder"], embed(embedder, tokens, positions), mask, heads, bias)
  if head == "mlm":
    return mlm_head(network["mlm_head"], hidden, f64(embedder["token_embedder"]["embedding"]))
  return binary_head(network["binary_head"], hidden)


def cross_entropy(logits, targets):
  """Per-position -log softmax(logits)[target]."""
  m = logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
  return log_z - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def sigmoid_cross_entropy(logits, labels):
  p = 1.0 / (1.0 + np.exp(-logits))
  return -(labels * np.log(p) + (1 - labels) * np.log1p(-p))


def electra_loss(params, batch, gen_heads, disc_heads, uniforms, sampling_vocab_size,
                 discriminator_weight=50.0, temperature=1.0):
  """ELECTRA §2: L = mean_masked CE(generator) + λ · mean_nonpad BCE(discriminator).

  `uniforms` [b, l] are the sampling's uniform numbers: each position takes the first
  id k with sum_{j<=k} p_j > u, p = softmax(logits / T) over the allowed ids
  1 .. sampling_vocab_size-1 (inverse transform sampling, float64).
  Returns a dict of the loss, its two terms, the samples and the labels.
  """
  targets = np.asarray(batch["encoder_target_tokens"])
  weights = f64(batch["mlm_weights"])
  seg, pos = batch.get("encoder_segment_ids"), batch.get("encoder_positions")
  gen_logits = forward(params["embedder"], params["generator"], "mlm",
                       batch["encoder_input_tokens"], gen_heads, seg, pos)
  gen_term = np.sum(cross_entropy(gen_logits, targets) * weights) / weights.sum()
  vocab = gen_logits.shape[-1]
  allowed = (np.arange(vocab) > 0) & (np.arange(vocab) < sampling_vocab_size)
  scores = np.where(allowed, gen_logits / temperature, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
  sampled = (cdf <= f64(uniforms)[..., None]).sum(-1)
  corrupted = np.where(weights > 0, sampled, targets)
  labels = ((corrupted != targets) & (targets > 0)).astype(np.float64)
  disc_logits = forward(params["embedder"], params["discriminator"], "binary", corrupted,
                        disc_heads, seg, pos)
  nonpad = (targets > 0).astype(np.float64)
  disc_term = np.sum(sigmoid_cross_entropy(disc_logits, labels) * nonpad) / nonpad.sum()
  return {"loss": gen_term + discriminator_weight * disc_term, "generator_loss": gen_term,
          "discriminator_loss": disc_term, "sampled": sampled, "corrupted": corrupted,
          "replaced": labels.astype(bool), "generator_logits": gen_logits,
          "discriminator_logits": disc_logits,
          "discriminator_accuracy": np.sum(((disc_logits > 0) == labels) * nonpad) / nonpad.sum()}

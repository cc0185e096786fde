"""An independent NumPy float64 implementation of the T5.1.1 forward pass.

Written from the T5 paper and T5X's conventions (not from t5xlike's code):
RMS norm, gated tanh-GELU MLP, unscaled dot-product attention (scaling is in
the query init), relative position buckets, masks from token id 0.
"""
import math

import numpy as np


def bucket(rel: int, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128) -> int:
  n = -rel
  ret = 0
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      ret += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  large = max_exact + int(math.log(n / max_exact + np.finfo(np.float32).eps)
                          / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  return ret + min(large, num_buckets - 1)


def rms_norm(x, scale):
  return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * scale


def gelu(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def attention(p, xq, xkv, mask, bias, heads):
  b, lq, _ = xq.shape
  lk = xkv.shape[1]
  q = (xq @ p["query"]["kernel"]).reshape(b, lq, heads, -1)
  k = (xkv @ p["key"]["kernel"]).reshape(b, lk, heads, -1)
  v = (xkv @ p["value"]["kernel"]).reshape(b, lk, heads, -1)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k)
  if bias is not None:
    logits = logits + bias
  logits = np.where(mask, logits, -1e10)
  out = np.einsum("bhqk,bkhd->bqhd", softmax(logits), v).reshape(b, lq, -1)
  return out @ p["out"]["kernel"]


def mlp(p, x):
  return (gelu(x @ p["wi_0"]["kernel"]) * (x @ p["wi_1"]["kernel"])) @ p["wo"]["kernel"]


def relpos(table, lq, lk, bidirectional):
  buckets = np.array([[bucket(k - q, bidirectional) for k in range(lk)] for q in range(lq)])
  return table[:, buckets][None]  # [1, heads, q, k]


def forward(params, heads, enc_tokens, dec_inputs, dec_targets, encoded_only=False):
  """float64 logits [b, ld, vocab] of T5.1.1 with `params` (nested dicts of arrays);
  with `encoded_only` the encoder's output [b, le, embed] (after its final norm)."""
  params = _to64(params)
  emb = params["token_embedder"]["embedding"]
  enc_valid = enc_tokens > 0
  enc_mask = (enc_valid[:, None, :, None] & enc_valid[:, None, None, :])
  e = params["encoder"]
  x = emb[enc_tokens]
  bias = relpos(e["relpos_bias"]["rel_embedding"], x.shape[1], x.shape[1], True)
  i = 0
  while f"layers_{i}" in e:
    lp = e[f"layers_{i}"]
    x = x + attention(lp["attention"], rms_norm(x, lp["pre_attention_layer_norm"]["scale"]),
                      rms_norm(x, lp["pre_attention_layer_norm"]["scale"]), enc_mask, bias, heads)
    x = x + mlp(lp["mlp"], rms_norm(x, lp["pre_mlp_layer_norm"]["scale"]))
    i += 1
  encoded = rms_norm(x, e["encoder_norm"]["scale"])
  if encoded_only:
    return encoded

  d = params["decoder"]
  ld = dec_inputs.shape[1]
  dec_valid = dec_targets > 0
  causal = np.tril(np.ones((ld, ld), bool))
  self_mask = (dec_valid[:, None, :, None] & dec_valid[:, None, None, :]) & causal
  cross_mask = dec_valid[:, None, :, None] & enc_valid[:, None, None, :]
  y = emb[dec_inputs]
  bias = relpos(d["relpos_bias"]["rel_embedding"], ld, ld, False)
  i = 0
  while f"layers_{i}" in d:
    lp = d[f"layers_{i}"]
    h = rms_norm(y, lp["pre_self_attention_layer_norm"]["scale"])
    y = y + attention(lp["self_attention"], h, h, self_mask, bias, heads)
    h = rms_norm(y, lp["pre_cross_attention_layer_norm"]["scale"])
    y = y + attention(lp["encoder_decoder_attention"], h, encoded, cross_mask, None, heads)
    y = y + mlp(lp["mlp"], rms_norm(y, lp["pre_mlp_layer_norm"]["scale"]))
    i += 1
  y = rms_norm(y, d["decoder_norm"]["scale"])
  return y @ d["logits_dense"]["kernel"]


def _to64(tree):
  if isinstance(tree, dict):
    return {k: _to64(v) for k, v in tree.items()}
  return np.asarray(tree, dtype=np.float64)

"""An independent NumPy float64 implementation of the Llama-style decoder-only forward pass.

Written from the Llama paper / HF `modeling_llama` conventions and T5X's
`make_decoder_mask` (not from t5xlike's code): RMS norm, RoPE with
`rotate_half` pairs (i, i + d/2) written here as complex rotations, GQA by
repeating key/value heads (HF `repeat_kv`), queries scaled by 1/sqrt(d) at
run time, SwiGLU MLP, causal + prefix + segment masks built entry by entry.
"""
import numpy as np


def rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * scale


def silu(x):
  return x / (1.0 + np.exp(-x))


def softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def rope(x, positions, wavelength):
  """x [b, l, h, d]; positions [b, l]: pair (i, i + d/2) as the complex number
  x_i + 1j x_{i+d/2}, multiplied by exp(1j * position * wavelength^(-2i/d))."""
  half = x.shape[-1] // 2
  freq = wavelength ** (-2.0 * np.arange(half) / x.shape[-1])
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[:, :, None, None] * freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def decoder_mask(targets, segment_ids=None, causal_attention=None):
  """bool [b, l, l]: entry by entry, T5X's make_decoder_mask."""
  b, l = targets.shape
  mask = np.zeros((b, l, l), bool)
  for r in range(b):
    for q in range(l):
      for k in range(l):
        visible = k <= q or (causal_attention is not None and causal_attention[r, q] == 1
                             and causal_attention[r, k] == 1)
        real = targets[r, q] > 0 and targets[r, k] > 0
        same = segment_ids is None or segment_ids[r, q] == segment_ids[r, k]
        mask[r, q, k] = visible and real and same
  return mask


def attention(p, x, mask, positions, heads, kv_heads, wavelength):
  b, l, _ = x.shape
  q = (x @ p["query"]["kernel"]).reshape(b, l, heads, -1)
  k = (x @ p["key"]["kernel"]).reshape(b, l, kv_heads, -1)
  v = (x @ p["value"]["kernel"]).reshape(b, l, kv_heads, -1)
  q, k = rope(q, positions, wavelength), rope(k, positions, wavelength)
  k = np.repeat(k, heads // kv_heads, axis=2)  # HF repeat_kv: query head h -> kv head h // g
  v = np.repeat(v, heads // kv_heads, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[:, None], logits, -1e10)
  out = np.einsum("bhqk,bkhd->bqhd", softmax(logits), v).reshape(b, l, -1)
  return out @ p["out"]["kernel"]


def mlp(p, x):
  return (silu(x @ p["wi_0"]["kernel"]) * (x @ p["wi_1"]["kernel"])) @ p["wo"]["kernel"]


def forward(params, heads, kv_heads, input_tokens, target_tokens, segment_ids=None,
            positions=None, causal_attention=None, wavelength=10000.0, eps=1e-6,
            states_only=False):
  """float64 logits [b, l, vocab] with `params` (nested dicts, unscanned layout); with
  `states_only` the last layer's states [b, l, embed] (after the final norm).

  Tied embeddings when `decoder/logits_dense` is absent (logits = x @ E^T)."""
  params = _to64(params)
  emb = params["token_embedder"]["embedding"]
  d = params["decoder"]
  b, l = input_tokens.shape
  if positions is None:
    positions = np.broadcast_to(np.arange(l), (b, l))
  positions = np.asarray(positions, np.float64)
  mask = decoder_mask(target_tokens, segment_ids, causal_attention)
  x = emb[input_tokens]
  i = 0
  while f"layers_{i}" in d:
    lp = d[f"layers_{i}"]
    h = rms_norm(x, lp["pre_self_attention_layer_norm"]["scale"], eps)
    x = x + attention(lp["self_attention"], h, mask, positions, heads, kv_heads, wavelength)
    x = x + mlp(lp["mlp"], rms_norm(x, lp["pre_mlp_layer_norm"]["scale"], eps))
    i += 1
  x = rms_norm(x, d["decoder_norm"]["scale"], eps)
  if states_only:
    return x
  if "logits_dense" in d:
    return x @ d["logits_dense"]["kernel"]
  return x @ emb.T


def _to64(tree):
  if isinstance(tree, dict):
    return {k: _to64(v) for k, v in tree.items()}
  return np.asarray(tree, dtype=np.float64)

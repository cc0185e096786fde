"""NumPy float64 forward passes that record what Minitron's importance reads, the
importance computed from the records, and the slice of the original each pruned
parameter must be (the references of tests/test_pruning.py and test_prune_command.py).

The forward passes follow tests/t5_numpy_reference.py and
tests/decoder_numpy_reference.py (their helpers are reused), with each
attention module returning its per-head outputs before the `out` projection.
The scores follow Minitron (Muralidharan et al. 2024): per head the L2 norm
over head_dim, per MLP unit and per norm channel the magnitude; each
aggregated as the mean over a row's real tokens, then the L2 norm over rows;
a layer's Block Importance is 1 - the mean cosine of its input and output
tokens.
"""
import re

import numpy as np

from tests import decoder_numpy_reference as dec, t5_numpy_reference as t5


def _heads_then_out(p, q, k, v, mask, bias, scale):
  """(attention output [b, q, embed], per-head outputs [b, q, heads, head_dim])."""
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if bias is not None:
    logits = logits + bias
  logits = np.where(mask, logits, -1e10)
  heads = np.einsum("bhqk,bkhd->bqhd", t5.softmax(logits), v)
  return heads.reshape(heads.shape[:2] + (-1,)) @ p["out"]["kernel"], heads


def _t5_attention(p, xq, xkv, mask, bias, num_heads):
  b, lq, lk = xq.shape[0], xq.shape[1], xkv.shape[1]
  q = (xq @ p["query"]["kernel"]).reshape(b, lq, num_heads, -1)
  k = (xkv @ p["key"]["kernel"]).reshape(b, lk, num_heads, -1)
  v = (xkv @ p["value"]["kernel"]).reshape(b, lk, num_heads, -1)
  return _heads_then_out(p, q, k, v, mask, bias, 1.0)


def _mlp(p, x, act):
  hidden = act(x @ p["wi_0"]["kernel"]) * (x @ p["wi_1"]["kernel"])
  return hidden @ p["wo"]["kernel"], hidden


def _norm(record, path, x, scale, eps=1e-6):
  y = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * scale
  record["norm"][path] = y
  return y


def _new_record():
  return {"heads": {}, "mlp": {}, "norm": {}, "layer": {}}


def t5_forward(params, num_heads, enc_tokens, dec_inputs, dec_targets):
  """(float64 logits [b, ld, vocab], record) of T5.1.1 (unscanned nested params)."""
  params = t5._to64(params)
  record = _new_record()
  emb = params["token_embedder"]["embedding"]
  enc_valid = enc_tokens > 0
  enc_mask = enc_valid[:, None, :, None] & enc_valid[:, None, None, :]
  e = params["encoder"]
  x = emb[enc_tokens]
  bias = t5.relpos(e["relpos_bias"]["rel_embedding"], x.shape[1], x.shape[1], True)
  i = 0
  while f"layers_{i}" in e:
    lp, path = e[f"layers_{i}"], f"encoder/layers_{i}"
    start = x
    h = _norm(record, f"{path}/pre_attention_layer_norm", x,
              lp["pre_attention_layer_norm"]["scale"])
    out, record["heads"][f"{path}/attention"] = _t5_attention(lp["attention"], h, h, enc_mask, bias,
                                                              num_heads)
    x = x + out
    h = _norm(record, f"{path}/pre_mlp_layer_norm", x, lp["pre_mlp_layer_norm"]["scale"])
    out, record["mlp"][f"{path}/mlp"] = _mlp(lp["mlp"], h, t5.gelu)
    x = x + out
    record["layer"][path] = (start, x)
    i += 1
  encoded = _norm(record, "encoder/encoder_norm", x, e["encoder_norm"]["scale"])
  d = params["decoder"]
  ld = dec_inputs.shape[1]
  dec_valid = dec_targets > 0
  causal = np.tril(np.ones((ld, ld), bool))
  self_mask = (dec_valid[:, None, :, None] & dec_valid[:, None, None, :]) & causal
  cross_mask = dec_valid[:, None, :, None] & enc_valid[:, None, None, :]
  y = emb[dec_inputs]
  bias = t5.relpos(d["relpos_bias"]["rel_embedding"], ld, ld, False)
  i = 0
  while f"layers_{i}" in d:
    lp, path = d[f"layers_{i}"], f"decoder/layers_{i}"
    start = y
    h = _norm(record, f"{path}/pre_self_attention_layer_norm", y,
              lp["pre_self_attention_layer_norm"]["scale"])
    out, record["heads"][f"{path}/self_attention"] = _t5_attention(
        lp["self_attention"], h, h, self_mask, bias, num_heads)
    y = y + out
    h = _norm(record, f"{path}/pre_cross_attention_layer_norm", y,
              lp["pre_cross_attention_layer_norm"]["scale"])
    out, record["heads"][f"{path}/encoder_decoder_attention"] = _t5_attention(
        lp["encoder_decoder_attention"], h, encoded, cross_mask, None, num_heads)
    y = y + out
    h = _norm(record, f"{path}/pre_mlp_layer_norm", y, lp["pre_mlp_layer_norm"]["scale"])
    out, record["mlp"][f"{path}/mlp"] = _mlp(lp["mlp"], h, t5.gelu)
    y = y + out
    record["layer"][path] = (start, y)
    i += 1
  y = _norm(record, "decoder/decoder_norm", y, d["decoder_norm"]["scale"])
  return y @ d["logits_dense"]["kernel"], record


def decoder_forward(params, num_heads, num_kv_heads, input_tokens, target_tokens,
                    wavelength=10000.0, eps=1e-6):
  """(float64 logits [b, l, vocab], record) of the Llama-style decoder (unscanned,
  untied output layer, positions 0..l-1)."""
  params = dec._to64(params)
  record = _new_record()
  emb = params["token_embedder"]["embedding"]
  d = params["decoder"]
  b, length = input_tokens.shape
  positions = np.broadcast_to(np.arange(length), (b, length)).astype(np.float64)
  mask = dec.decoder_mask(target_tokens)[:, None]
  x = emb[input_tokens]
  i = 0
  while f"layers_{i}" in d:
    lp, path = d[f"layers_{i}"], f"decoder/layers_{i}"
    start = x
    h = _norm(record, f"{path}/pre_self_attention_layer_norm", x,
              lp["pre_self_attention_layer_norm"]["scale"], eps)
    p = lp["self_attention"]
    q = dec.rope((h @ p["query"]["kernel"]).reshape(b, length, num_heads, -1), positions,
                 wavelength)
    k = dec.rope((h @ p["key"]["kernel"]).reshape(b, length, num_kv_heads, -1), positions,
                 wavelength)
    v = (h @ p["value"]["kernel"]).reshape(b, length, num_kv_heads, -1)
    group = num_heads // num_kv_heads
    out, record["heads"][f"{path}/self_attention"] = _heads_then_out(
        p, q, np.repeat(k, group, axis=2), np.repeat(v, group, axis=2), mask, None,
        1.0 / np.sqrt(q.shape[-1]))
    x = x + out
    h = _norm(record, f"{path}/pre_mlp_layer_norm", x, lp["pre_mlp_layer_norm"]["scale"], eps)
    out, record["mlp"][f"{path}/mlp"] = _mlp(lp["mlp"], h, dec.silu)
    x = x + out
    record["layer"][path] = (start, x)
    i += 1
  x = _norm(record, "decoder/decoder_norm", x, d["decoder_norm"]["scale"], eps)
  return x @ d["logits_dense"]["kernel"], record


def _agg(values, valid):
  """values [b, l, n] >= 0, valid bool [b, l] -> L2 over rows of the mean over real tokens."""
  counts = np.maximum(valid.sum(axis=1), 1)
  means = (values * valid[..., None]).sum(axis=1) / counts[:, None]
  return np.sqrt((means ** 2).sum(axis=0))


def scores(record, valid):
  """{'heads' | 'mlp' | 'norm': {path: [n]}, 'embedding': [emb], 'layers': {path: BI}}
  from a record; `valid` = {stack: bool [b, l] real tokens}."""
  stack = lambda path: valid[path.split("/")[0]]
  out = {"heads": {p: _agg(np.linalg.norm(v, axis=-1), stack(p))
                   for p, v in record["heads"].items()},
         "mlp": {p: _agg(np.abs(v), stack(p)) for p, v in record["mlp"].items()},
         "norm": {p: _agg(np.abs(v), stack(p)) for p, v in record["norm"].items()},
         "layers": {}}
  out["embedding"] = np.sum(list(out["norm"].values()), axis=0)
  for path, (x, y) in record["layer"].items():
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    out["layers"][path] = 1.0 - cos[stack(path)].mean()
  return out


def _head_columns(heads, head_dim):
  return np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def original_name(name, kept):
  """The original parameter of a pruned one: kept layer j of a stack is its kept[j]."""
  match = re.match(r"^([^/]+)/layers_(\d+)/(.*)$", name)
  if match is None:
    return name
  return f"{match[1]}/layers_{kept['layers'][match[1]][int(match[2])]}/{match[3]}"


def expected_slice(name, original, kept, head_dim):
  """The slice of `original` (the parameter `name`, unscanned, original naming) a pruned
  parameter must equal, written out per parameter kind; `kept` as prune.json's "kept"
  ({'embedding': [...], 'heads' / 'kv_heads' / 'mlp': {module: [...]}, 'relpos': {stack:
  [...]}})."""
  emb = np.asarray(kept["embedding"])
  module = name.rsplit("/", 2)[0]
  heads = lambda table: _head_columns(kept[table][module], head_dim)
  if name.endswith("/query/kernel"):
    return original[np.ix_(emb, heads("heads"))]
  if name.endswith(("/key/kernel", "/value/kernel")):
    return original[np.ix_(emb, heads("kv_heads"))]
  if name.endswith("/out/kernel"):
    return original[np.ix_(heads("heads"), emb)]
  if re.search(r"/mlp/wi(_\d)?/kernel$", name):
    return original[np.ix_(emb, np.asarray(kept["mlp"][module]))]
  if name.endswith("/mlp/wo/kernel"):
    return original[np.ix_(np.asarray(kept["mlp"][module]), emb)]
  if name.endswith("/scale"):
    return original[emb]
  if name == "token_embedder/embedding":
    return original[:, emb]
  if name.endswith("logits_dense/kernel"):
    return original[emb, :]
  if name.endswith("relpos_bias/rel_embedding"):
    return original[np.asarray(kept["relpos"][name.split("/")[0]]), :]
  raise AssertionError(f"no expectation for {name}")


def assert_slices(original, pruned, kept, head_dim):
  """Every pruned parameter (unscanned flat dicts) equals its expected slice."""
  for name, value in pruned.items():
    source = original_name(name, kept)
    np.testing.assert_array_equal(value, expected_slice(source, original[source], kept,
                                                        head_dim), err_msg=name)

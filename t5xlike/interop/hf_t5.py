"""Hugging Face T5 (`T5ForConditionalGeneration`; T5 v1.0, T5.1.1, mT5, UL2 shapes) and
umT5 (`UMT5ForConditionalGeneration`) <-> t5xlike `t5.Transformer`.

Numerics that must agree, and do: neither scales attention logits at run
time (1/sqrt(d_kv) lives in the query weights); HF's `gated-gelu` is
`gelu_new`, the tanh approximation, as flax's `nn.gelu` that t5xlike's
'gelu' is; relative position buckets are T5's; a tied output layer
(T5 v1.0) multiplies the decoder output by d_model**-0.5 in both
(`logits_via_embedding`). transformers >= 5 always ties `lm_head` to
`shared` and reads the rescaling from `scale_decoder_outputs` (older
versions: from `tie_word_embeddings`); both keys are read and written.
mT5 (`model_type='mt5'`) never rescales, whatever its config says.
umT5 (`model_type='umt5'`) is T5.1.1 with a relative position table in every
self-attention layer (`relative_attention_per_layer=True`); it reads the
rescaling as T5 does.

Activation names (`feed_forward_proj`): 'gated-gelu' <-> ('gelu', 'linear'),
'gated-silu' <-> ('silu', 'linear'), 'gated-relu' <-> ('relu', 'linear'),
'relu' <-> ('relu',), 'gelu_new' <-> ('gelu',), 'gelu' <-> ('gelu_exact',).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from t5xlike.interop import hf_names, hf_weights
from t5xlike.models import t5

log = logging.getLogger(__name__)

MODEL_TYPES = ("t5", "mt5", "umt5")
_HF_TO_OURS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact",
               "relu": "relu", "silu": "silu", "swish": "silu"}
_OURS_TO_HF = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}
LAYER_NORM_EPSILON = 1e-6  # t5xlike's RMSNorm default.


def activations_from_hf(feed_forward_proj: str) -> tuple[str, ...]:
  """HF `feed_forward_proj` -> t5xlike `mlp_activations`."""
  if feed_forward_proj == "gated-gelu":
    return ("gelu", "linear")
  gated, _, name = feed_forward_proj.rpartition("-")
  if gated not in ("", "gated") or name not in _HF_TO_OURS:
    raise ValueError(f"feed_forward_proj={feed_forward_proj!r} has no t5xlike equivalent "
                     f"(known: gated-<act> or <act> with act in {sorted(_HF_TO_OURS)})")
  return (_HF_TO_OURS[name], "linear") if gated else (_HF_TO_OURS[name],)


def activations_to_hf(activations: tuple[str, ...]) -> str:
  """t5xlike `mlp_activations` -> HF `feed_forward_proj`."""
  if len(activations) == 2 and activations[1] == "linear" and activations[0] in _OURS_TO_HF:
    return "gated-gelu" if activations[0] == "gelu" else f"gated-{_OURS_TO_HF[activations[0]]}"
  if len(activations) == 1 and activations[0] in _OURS_TO_HF:
    return _OURS_TO_HF[activations[0]]
  raise ValueError(f"mlp_activations={activations} has no HF T5 equivalent")


def config_from_hf(hf: Mapping[str, Any], scan_layers: bool = False) -> t5.T5Config:
  """A `config.json` of HF T5 / mT5 / umT5 -> `t5.T5Config` (float32, no dropout)."""
  if hf.get("model_type") not in MODEL_TYPES:
    raise ValueError(f"model_type={hf.get('model_type')!r} is not one of {MODEL_TYPES}")
  epsilon = float(hf.get("layer_norm_epsilon", LAYER_NORM_EPSILON))
  if epsilon != LAYER_NORM_EPSILON:
    raise ValueError(f"layer_norm_epsilon={epsilon}: t5xlike's T5 uses {LAYER_NORM_EPSILON}")
  tied = hf.get("tie_word_embeddings", True)
  # mT5 never rescales (its transformers code has no d_model**-0.5; its config forces
  # tie_word_embeddings=True on save); T5 reads the rescaling as described above.
  scaled = False if hf["model_type"] == "mt5" else hf.get("scale_decoder_outputs", tied)
  layers = int(hf.get("num_layers", 6))
  return t5.T5Config(
      vocab_size=int(hf["vocab_size"]), emb_dim=int(hf["d_model"]),
      num_heads=int(hf["num_heads"]), num_encoder_layers=layers,
      num_decoder_layers=int(hf.get("num_decoder_layers") or layers),
      head_dim=int(hf["d_kv"]), mlp_dim=int(hf["d_ff"]),
      mlp_activations=activations_from_hf(hf.get("feed_forward_proj", "relu")),
      logits_via_embedding=bool(scaled),
      relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
      relative_attention_per_layer=hf["model_type"] == "umt5", scan_layers=scan_layers)


def config_to_hf(cfg: t5.T5Config, eos_id: int = 1) -> dict[str, Any]:
  """`t5.T5Config` -> HF `config.json` (T5ForConditionalGeneration, or
  UMT5ForConditionalGeneration with `relative_attention_per_layer`)."""
  feed_forward_proj = activations_to_hf(tuple(cfg.mlp_activations))
  tied = bool(cfg.logits_via_embedding)
  umt5 = bool(cfg.relative_attention_per_layer)
  return {
      "architectures": ["UMT5ForConditionalGeneration" if umt5 else "T5ForConditionalGeneration"],
      "model_type": "umt5" if umt5 else "t5",
      "vocab_size": cfg.vocab_size, "d_model": cfg.emb_dim, "d_kv": cfg.head_dim,
      "d_ff": cfg.mlp_dim, "num_layers": cfg.num_encoder_layers,
      "num_decoder_layers": cfg.num_decoder_layers, "num_heads": cfg.num_heads,
      "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
      "relative_attention_max_distance": cfg.relative_attention_max_distance,
      "dropout_rate": float(cfg.dropout_rate), "layer_norm_epsilon": LAYER_NORM_EPSILON,
      "initializer_factor": 1.0, "feed_forward_proj": feed_forward_proj,
      "is_encoder_decoder": True, "use_cache": True, "pad_token_id": 0,
      "eos_token_id": eos_id, "decoder_start_token_id": 0,
      "tie_word_embeddings": tied, "scale_decoder_outputs": tied,
      "torch_dtype": "float32",
  }


def links(cfg: t5.T5Config) -> list[hf_names.Link]:
  return hf_names.t5_links(cfg.num_encoder_layers, cfg.num_decoder_layers,
                           gated=len(cfg.mlp_activations) > 1,
                           untied_head=not cfg.logits_via_embedding,
                           per_layer_relpos=cfg.relative_attention_per_layer)


def import_params(reader: hf_weights.WeightReader, cfg: t5.T5Config) -> Iterator[
    tuple[str, np.ndarray]]:
  """(t5xlike unscanned path, float32 array) for every parameter, one at a time.

  An untied model whose directory has no `lm_head.weight` (transformers >= 5
  saves a tied head once, as `shared.weight`) takes the embedding as its
  output kernel. Extra HF tensors (`encoder.embed_tokens`, a tied `lm_head`)
  are logged, not read.
  """
  def source(link: hf_names.Link) -> str:
    if link.hf == "lm_head.weight" and link.hf not in reader:
      log.info("no lm_head.weight: the output layer is the (unscaled) embedding")
      return "shared.weight"
    return link.hf
  return hf_names.import_tensors(links(cfg), reader, source)


def export_params(flat: Mapping[str, np.ndarray], cfg: t5.T5Config) -> Iterator[
    tuple[str, np.ndarray]]:
  """(HF name, float32 array) for every tensor of the HF state dict (tied copies omitted)."""
  return hf_names.export_tensors(links(cfg), flat)

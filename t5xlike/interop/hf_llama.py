"""Hugging Face Llama (`LlamaForCausalLM`) <-> t5xlike `decoder.Transformer`.

Both: RMS norm (weight * x / sqrt(mean(x^2) + eps)), RoPE in the
`rotate_half` layout with inv_freq = theta ** (-2i / head_dim), queries
divided by sqrt(head_dim) at run time, grouped-query attention (query head h
uses key/value head h // (heads / kv_heads)), SwiGLU (gate = wi_0 through
SiLU, up = wi_1), no biases. HF's q/k weights are already in the
rotate_half order, so no permutation is needed. Scaled RoPE variants
(`rope_type` other than 'default'), biases and other activations are refused.

t5xlike feeds id 0 as BOS and treats it as padding (the feature converters'
convention); an imported Llama's own BOS id is only a token to it.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from t5xlike.interop import hf_names, hf_weights
from t5xlike.models import decoder

MODEL_TYPES = ("llama",)


def rope_theta(hf: Mapping[str, Any]) -> float:
  """RoPE base of a Llama config (transformers >= 5 `rope_parameters`, or `rope_theta`)."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for spec in (params, scaling):
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind != "default":
      raise ValueError(f"rope_type={kind!r}: only plain RoPE ('default') is supported")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: Mapping[str, Any], scan_layers: bool = False) -> decoder.DecoderConfig:
  """A `config.json` of HF Llama -> `decoder.DecoderConfig` (float32, no dropout)."""
  if hf.get("model_type") not in MODEL_TYPES:
    raise ValueError(f"model_type={hf.get('model_type')!r} is not one of {MODEL_TYPES}")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ValueError(f"{flag}=true: t5xlike's decoder has no biases")
  if hf.get("hidden_act", "silu") not in ("silu", "swish"):
    raise ValueError(f"hidden_act={hf.get('hidden_act')!r}: t5xlike's Llama MLP is SwiGLU (silu)")
  heads = int(hf["num_attention_heads"])
  return decoder.DecoderConfig(
      vocab_size=int(hf["vocab_size"]), emb_dim=int(hf["hidden_size"]), num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      num_layers=int(hf["num_hidden_layers"]),
      head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
      mlp_dim=int(hf["intermediate_size"]), mlp_activations=("silu", "linear"),
      rope_max_wavelength=rope_theta(hf),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), scan_layers=scan_layers)


def config_to_hf(cfg: decoder.DecoderConfig, max_position_embeddings: int = 2048,
                 eos_id: int = 1) -> dict[str, Any]:
  """`decoder.DecoderConfig` -> HF `config.json` (LlamaForCausalLM)."""
  if tuple(cfg.mlp_activations) not in (("silu", "linear"), ("swish", "linear")):
    raise ValueError(f"mlp_activations={tuple(cfg.mlp_activations)}: HF Llama is SwiGLU "
                     "('silu', 'linear')")
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.emb_dim,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_epsilon,
      "rope_theta": cfg.rope_max_wavelength,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_max_wavelength},
      "max_position_embeddings": max_position_embeddings,
      "tie_word_embeddings": bool(cfg.tie_embeddings), "attention_bias": False,
      "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
      # t5xlike's conventions: id 0 is BOS and padding, EOS from the vocabulary.
      "bos_token_id": 0, "pad_token_id": 0, "eos_token_id": eos_id, "torch_dtype": "float32",
  }


def links(cfg: decoder.DecoderConfig) -> list[hf_names.Link]:
  return hf_names.llama_links(cfg.num_layers, untied_head=not cfg.tie_embeddings)


def import_params(reader: hf_weights.WeightReader, cfg: decoder.DecoderConfig) -> Iterator[
    tuple[str, np.ndarray]]:
  """(t5xlike unscanned path, float32 array) for every parameter, one at a time."""
  return hf_names.import_tensors(links(cfg), reader)


def export_params(flat: Mapping[str, np.ndarray], cfg: decoder.DecoderConfig) -> Iterator[
    tuple[str, np.ndarray]]:
  """(HF name, float32 array) for every tensor of the HF state dict."""
  return hf_names.export_tensors(links(cfg), flat)

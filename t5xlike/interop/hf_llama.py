"""Hugging Face Llama-style decoders (`LlamaForCausalLM`, `Qwen2ForCausalLM`,
`MistralForCausalLM`) <-> t5xlike `decoder.Transformer`.

All: RMS norm (weight * x / sqrt(mean(x^2) + eps)), RoPE in the
`rotate_half` layout with inv_freq = theta ** (-2i / head_dim), queries
divided by sqrt(head_dim) at run time, grouped-query attention (query head h
uses key/value head h // (heads / kv_heads)), SwiGLU (gate = wi_0 through
SiLU, up = wi_1). HF's q/k weights are already in the rotate_half order, so
no permutation is needed. The same state-dict names in all three.

Per family (`model_type`):
  llama: no biases; RoPE 'default' or Llama 3.x's 'llama3' frequency scaling
    (`rope_parameters` of transformers >= 5, or `rope_scaling`) <->
    `rope_type='llama3'` and the `rope_*` fields of `DecoderConfig`.
  qwen2: biases on q/k/v (not o) <-> `qkv_bias=True`; sliding-window
    attention (`use_sliding_window: true`) is refused.
  mistral: Llama's network plus `sliding_window`: t5xlike has no
    sliding-window mask, so a window shorter than `max_position_embeddings`
    (Mistral 7B v0.1's 4096 of 32768) is refused; none (v0.2, v0.3) or one at
    least as long as the context imports as a plain causal decoder.
Other RoPE scalings (linear, dynamic, yarn, longrope), partial rotary,
Llama's `attention_bias` (biases on o too), `mlp_bias` and other
activations are refused with the key named. Export picks `qwen2` for a
`qkv_bias` network and `llama` otherwise, unless a family is asked for
(`mistral` writes `sliding_window: null`).

t5xlike feeds id 0 as BOS and treats it as padding (the feature converters'
convention); an imported model's own BOS id is only a token to it.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from t5xlike.interop import hf_names, hf_weights
from t5xlike.models import decoder

MODEL_TYPES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}
#: HF `rope_parameters` keys of 'llama3' <-> `DecoderConfig` fields.
_LLAMA3_KEYS = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
                "high_freq_factor": "rope_high_freq_factor",
                "original_max_position_embeddings": "rope_original_max_positions"}


def rope_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
  """`DecoderConfig` RoPE fields of an HF config: `rope_max_wavelength`, and for
  'llama3' `rope_type` with the four scaling fields (transformers >= 5
  `rope_parameters`, older `rope_scaling` + `rope_theta`)."""
  spec = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  nested = sorted(key for key, value in spec.items() if isinstance(value, Mapping))
  if nested:
    raise ValueError(f"rope_parameters per layer type ({', '.join(nested)}): t5xlike's "
                     "decoder has one RoPE for every layer")
  kind = spec.get("rope_type", spec.get("type", "default"))
  if kind not in ("default", "llama3"):
    raise ValueError(f"rope_type={kind!r}: only plain RoPE ('default') and Llama 3's "
                     "'llama3' scaling are supported")
  if float(spec.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError(f"partial_rotary_factor={spec['partial_rotary_factor']}: t5xlike "
                     "rotates the whole head")
  fields: dict[str, Any] = {
      "rope_max_wavelength": float(spec.get("rope_theta", hf.get("rope_theta", 10000.0)))}
  if kind == "llama3":
    # As transformers: a top-level original_max_position_embeddings (Phi-3 style) first,
    # then rope_parameters', then max_position_embeddings.
    if hf.get("original_max_position_embeddings") is not None:
      spec["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    spec.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    missing = [key for key in _LLAMA3_KEYS if spec.get(key) is None]
    if missing:
      raise ValueError(f"rope_type='llama3' without {', '.join(missing)}")
    fields["rope_type"] = "llama3"
    for key, field in _LLAMA3_KEYS.items():
      fields[field] = int(spec[key]) if field == "rope_original_max_positions" else float(
          spec[key])
  return fields


def _check_family(hf: Mapping[str, Any]) -> bool:
  """Refuses what the family's network has and t5xlike's lacks; returns qkv_bias."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r} is not one of {MODEL_TYPES}")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ValueError(f"{flag}=true: t5xlike's decoder has no biases on the output "
                       "projection or the MLP")
  if model_type == "qwen2":
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if hf.get("use_sliding_window") or layer_types != {"full_attention"}:
      raise ValueError("use_sliding_window=true: t5xlike's decoder has no sliding-window "
                       "attention")
  window = hf.get("sliding_window")
  context = hf.get("max_position_embeddings")
  if model_type == "mistral" and window is not None and (context is None or window < context):
    raise ValueError(f"sliding_window={window} < max_position_embeddings={context}: "
                     "t5xlike's decoder has no sliding-window attention")
  return model_type == "qwen2"


def config_from_hf(hf: Mapping[str, Any], scan_layers: bool = False) -> decoder.DecoderConfig:
  """A `config.json` of HF Llama / Qwen2 / Mistral -> `decoder.DecoderConfig` (float32,
  no dropout); ValueError naming the key of what t5xlike cannot run."""
  qkv_bias = _check_family(hf)
  if hf.get("hidden_act", "silu") not in ("silu", "swish"):
    raise ValueError(f"hidden_act={hf.get('hidden_act')!r}: t5xlike's Llama MLP is SwiGLU (silu)")
  heads = int(hf["num_attention_heads"])
  return decoder.DecoderConfig(
      vocab_size=int(hf["vocab_size"]), emb_dim=int(hf["hidden_size"]), num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      num_layers=int(hf["num_hidden_layers"]),
      head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
      mlp_dim=int(hf["intermediate_size"]), mlp_activations=("silu", "linear"),
      **rope_fields(hf), qkv_bias=qkv_bias,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), scan_layers=scan_layers)


def export_model_type(cfg: decoder.DecoderConfig, requested: str = "auto") -> str:
  """The HF family a network is written as: `requested`, or for 'auto' 'qwen2' when
  it has q/k/v biases and 'llama' otherwise (ValueError when it cannot be)."""
  if requested == "auto":
    return "qwen2" if cfg.qkv_bias else "llama"
  if requested not in MODEL_TYPES:
    raise ValueError(f"--hf_model_type={requested!r} is not one of auto, {', '.join(MODEL_TYPES)}")
  if cfg.qkv_bias != (requested == "qwen2"):
    has = "has" if cfg.qkv_bias else "has no"
    raise ValueError(f"--hf_model_type={requested}: the network {has} q/k/v biases "
                     "(qkv_bias), which only qwen2 has")
  return requested


def _rope_to_hf(cfg: decoder.DecoderConfig) -> dict[str, Any]:
  params: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_max_wavelength}
  if cfg.rope_type == "llama3":
    for key, field in _LLAMA3_KEYS.items():
      params[key] = getattr(cfg, field)
  return params


def config_to_hf(cfg: decoder.DecoderConfig, max_position_embeddings: int = 2048,
                 eos_id: int = 1, model_type: str = "auto") -> dict[str, Any]:
  """`decoder.DecoderConfig` -> HF `config.json` of `export_model_type(cfg, model_type)`."""
  if tuple(cfg.mlp_activations) not in (("silu", "linear"), ("swish", "linear")):
    raise ValueError(f"mlp_activations={tuple(cfg.mlp_activations)}: HF Llama is SwiGLU "
                     "('silu', 'linear')")
  family = export_model_type(cfg, model_type)
  rope_parameters = _rope_to_hf(cfg)
  hf: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[family]], "model_type": family,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.emb_dim,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_epsilon,
      "rope_theta": cfg.rope_max_wavelength, "rope_parameters": rope_parameters,
      "max_position_embeddings": max_position_embeddings,
      "tie_word_embeddings": bool(cfg.tie_embeddings), "attention_dropout": 0.0,
      "initializer_range": 0.02,
      # t5xlike's conventions: id 0 is BOS and padding, EOS from the vocabulary.
      "bos_token_id": 0, "pad_token_id": 0, "eos_token_id": eos_id, "torch_dtype": "float32",
  }
  if cfg.rope_type == "llama3":  # What transformers < 5 reads (>= 5: rope_parameters).
    hf["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
  if family == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  elif family == "mistral":
    hf.update(sliding_window=None)
  else:
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
              layer_types=["full_attention"] * cfg.num_layers)
  return hf


def links(cfg: decoder.DecoderConfig) -> list[hf_names.Link]:
  return hf_names.llama_links(cfg.num_layers, untied_head=not cfg.tie_embeddings,
                              qkv_bias=cfg.qkv_bias)


def import_params(reader: hf_weights.WeightReader, cfg: decoder.DecoderConfig) -> Iterator[
    tuple[str, np.ndarray]]:
  """(t5xlike unscanned path, float32 array) for every parameter, one at a time."""
  return hf_names.import_tensors(links(cfg), reader)


def export_params(flat: Mapping[str, np.ndarray], cfg: decoder.DecoderConfig) -> Iterator[
    tuple[str, np.ndarray]]:
  """(HF name, float32 array) for every tensor of the HF state dict."""
  return hf_names.export_tensors(links(cfg), flat)

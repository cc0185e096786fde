"""Small random `transformers` models saved to disk, and their logits (PyTorch, CPU,
float32): the peer-library reference of the conversion tests (no hub)."""
from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

VOCAB = 128


def t5_model(v1_1: bool, seed: int = 0) -> transformers.T5ForConditionalGeneration:
  """T5.1.1 (gated-GELU, untied head) or T5 v1.0 (ReLU, tied head rescaled by
  d_model**-0.5): d_model 32, 4 heads x 8, d_ff 64, 2+2 layers, 8 position
  buckets up to distance 16 (so short inputs reach the logarithmic buckets)."""
  torch.manual_seed(seed)
  config = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
      dropout_rate=0.0, feed_forward_proj="gated-gelu" if v1_1 else "relu",
      tie_word_embeddings=not v1_1)
  model = transformers.T5ForConditionalGeneration(config).eval()
  if v1_1:  # transformers >= 5 ties lm_head at init; T5.1.1 has its own.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
  with torch.no_grad():  # Non-trivial norm scales.
    for name, param in model.named_parameters():
      if "layer_norm" in name:
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
  return model


def mt5_model(seed: int = 3) -> transformers.MT5ForConditionalGeneration:
  """mT5 (model_type 'mt5': T5.1.1's architecture, untied head), 1+1 layers."""
  torch.manual_seed(seed)
  config = transformers.MT5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1,
      num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  model = transformers.MT5ForConditionalGeneration(config).eval()
  model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
  return model


def umt5_model(seed: int = 8) -> transformers.UMT5ForConditionalGeneration:
  """umT5 (model_type 'umt5': a relative position table in every self-attention layer,
  untied head), t5_model's T5.1.1 dimensions and buckets, 2+2 layers."""
  torch.manual_seed(seed)
  config = transformers.UMT5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
      dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  model = transformers.UMT5ForConditionalGeneration(config).eval()
  model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
  with torch.no_grad():  # Non-trivial norm scales; position tables of order 1.
    for name, param in model.named_parameters():
      if "layer_norm" in name:
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      elif "relative_attention_bias" in name:
        param.copy_(torch.randn_like(param))
  return model


def llama_model(seed: int = 0, tied: bool = False) -> transformers.LlamaForCausalLM:
  """Llama-style: d_model 32, 4 query heads x 8 sharing 2 key/value heads, SwiGLU 64,
  2 layers, RoPE base 500, RMS eps 1e-5, untied (or tied) head."""
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
      max_position_embeddings=64, tie_word_embeddings=tied,
      rope_parameters={"rope_type": "default", "rope_theta": 500.0})
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name:
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
  return model


def _decoder_dims(**overrides) -> dict:
  """llama_model's dimensions, as keyword arguments of a transformers decoder config."""
  return {**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                max_position_embeddings=64, tie_word_embeddings=False), **overrides}


def _randomized(model, biases: bool = False):
  """Non-trivial norm scales (and biases): what zero / one init would hide."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name:
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      elif biases and name.endswith(".bias"):
        param.copy_(0.5 * torch.randn_like(param))
  return model.eval()


def llama3_model(seed: int = 5) -> transformers.LlamaForCausalLM:
  """llama_model with Llama 3.x RoPE scaling ('llama3': factor 8, low 1, high 4, original
  context 64 positions): with head_dim 8 and base 500 the wavelengths are 6.3, 30, 140 and
  664 positions, so one pair is kept, one interpolated and two slowed down."""
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**_decoder_dims(max_position_embeddings=256), rope_parameters={
      "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
  model = _randomized(transformers.LlamaForCausalLM(config))
  with torch.no_grad():  # Attention logits of order 1, so positions (RoPE) matter.
    for layer in model.model.layers:
      layer.self_attn.q_proj.weight.mul_(10.0)
      layer.self_attn.k_proj.weight.mul_(10.0)
  return model


def qwen2_model(seed: int = 6, tied: bool = False) -> transformers.Qwen2ForCausalLM:
  """Qwen2 / Qwen2.5 (biases on q/k/v, random here), llama_model's dimensions, no
  sliding window."""
  torch.manual_seed(seed)
  config = transformers.Qwen2Config(**_decoder_dims(tie_word_embeddings=tied),
                                    rope_parameters={"rope_type": "default", "rope_theta": 700.0},
                                    use_sliding_window=False)
  return _randomized(transformers.Qwen2ForCausalLM(config), biases=True)


def mistral_model(seed: int = 7, sliding_window: int | None = None
                  ) -> transformers.MistralForCausalLM:
  """Mistral (v0.2 / v0.3: no sliding window), llama_model's dimensions."""
  torch.manual_seed(seed)
  config = transformers.MistralConfig(**_decoder_dims(), sliding_window=sliding_window,
                                      rope_parameters={"rope_type": "default",
                                                       "rope_theta": 1000.0})
  return _randomized(transformers.MistralForCausalLM(config))


def save(model, directory: pathlib.Path) -> pathlib.Path:
  """config.json + model.safetensors with every distinct tensor (an untied lm_head too)."""
  directory.mkdir(parents=True, exist_ok=True)
  model.config.save_pretrained(directory)
  tensors = {}
  state = model.state_dict()
  embedding = state.get("shared.weight", state.get("model.embed_tokens.weight"))
  for name, tensor in state.items():
    if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
      continue  # Tied to shared.weight.
    if name == "lm_head.weight" and torch.equal(tensor, embedding):
      continue  # Tied (T5 v1.0, tied Llama).
    tensors[name] = tensor.detach().clone().contiguous()
  save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
  return directory


def t5_logits(model, encoder_tokens: np.ndarray, decoder_inputs: np.ndarray) -> np.ndarray:
  """float32 [b, ld, vocab]; encoder padding (id 0) masked."""
  with torch.no_grad():
    out = model(input_ids=torch.tensor(encoder_tokens, dtype=torch.long),
                attention_mask=torch.tensor(encoder_tokens > 0, dtype=torch.long),
                decoder_input_ids=torch.tensor(decoder_inputs, dtype=torch.long))
  return out.logits.numpy()


def llama_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()

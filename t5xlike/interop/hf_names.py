"""Parameter-name maps between t5xlike (unscanned paths) and Hugging Face
`transformers` state dicts.

A `Link` joins one t5xlike parameter to one HF tensor. HF stores a Linear
layer's `weight` as `[out, in]`, the transpose of a t5xlike kernel `[in, out]`,
and T5's relative attention bias as `[buckets, heads]`, the transpose of
`rel_embedding` `[heads, buckets]`; embeddings and norm scales are the same.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Link:
  """t5xlike path `ours` <-> HF tensor `hf`; `transpose`: HF = ours.T."""
  ours: str
  hf: str
  transpose: bool

  def to_hf(self, value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.T) if self.transpose else value

  def to_ours(self, value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.T) if self.transpose else value


def import_tensors(links: Iterable[Link], reader: Any,
                   source: Callable[[Link], str] = lambda link: link.hf
                   ) -> Iterator[tuple[str, np.ndarray]]:
  """(t5xlike path, float32 array) per link, read one at a time from `reader` (an
  `hf_weights.WeightReader`) under the HF name `source(link)`; the reader's
  tensors no link read are logged."""
  used = set()
  for link in links:
    name = source(link)
    used.add(name)
    yield link.ours, link.to_ours(np.asarray(reader.get(name), np.float32))
  ignored = [n for n in reader.names() if n not in used]
  if ignored:
    log.info("HF tensors not read (tied copies or unused): %s", ", ".join(ignored))


def export_tensors(links: Iterable[Link], flat: Mapping[str, np.ndarray]
                   ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 array) per link, from flat t5xlike parameters."""
  for link in links:
    yield link.hf, link.to_hf(np.asarray(flat[link.ours], np.float32))


def _attention(ours: str, hf: str, names: tuple[str, str, str, str]) -> list[Link]:
  """q/k/v/o projections: ours `query,key,value,out` <-> HF `names`."""
  return [Link(f"{ours}/{o}/kernel", f"{hf}.{h}.weight", True)
          for o, h in zip(("query", "key", "value", "out"), names)]


def _t5_mlp(ours: str, hf: str, gated: bool) -> list[Link]:
  inputs = ("wi_0", "wi_1") if gated else ("wi",)
  return [Link(f"{ours}/{name}/kernel", f"{hf}.{name}.weight", True)
          for name in inputs + ("wo",)]


def _relpos(stack: str, layer: int, per_layer: bool) -> Link:
  ours = f"{stack}/layers_{layer}/relpos_bias" if per_layer else f"{stack}/relpos_bias"
  return Link(f"{ours}/rel_embedding",
              f"{stack}.block.{layer}.layer.0.SelfAttention.relative_attention_bias.weight", True)


def t5_links(num_encoder_layers: int, num_decoder_layers: int, gated: bool,
             untied_head: bool, per_layer_relpos: bool = False) -> list[Link]:
  """t5xlike `t5.Transformer` <-> HF `T5ForConditionalGeneration` (also mT5, UL2) or,
  with `per_layer_relpos`, `UMT5ForConditionalGeneration`.

  HF T5 holds the relative attention bias in block 0 of each stack only (the
  other blocks reuse it), as t5xlike's one `relpos_bias` per stack; umT5 has
  one in every block's self-attention, as `layers_<i>/relpos_bias`. With
  `untied_head`, `decoder/logits_dense` <-> `lm_head`.
  """
  qkvo = ("q", "k", "v", "o")
  links = [Link("token_embedder/embedding", "shared.weight", False),
           Link("encoder/encoder_norm/scale", "encoder.final_layer_norm.weight", False),
           Link("decoder/decoder_norm/scale", "decoder.final_layer_norm.weight", False)]
  if per_layer_relpos:
    links += [_relpos("encoder", i, True) for i in range(num_encoder_layers)]
    links += [_relpos("decoder", i, True) for i in range(num_decoder_layers)]
  else:
    links += [_relpos("encoder", 0, False), _relpos("decoder", 0, False)]
  for i in range(num_encoder_layers):
    ours, hf = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
    links += [Link(f"{ours}/pre_attention_layer_norm/scale", f"{hf}.0.layer_norm.weight", False),
              *_attention(f"{ours}/attention", f"{hf}.0.SelfAttention", qkvo),
              Link(f"{ours}/pre_mlp_layer_norm/scale", f"{hf}.1.layer_norm.weight", False),
              *_t5_mlp(f"{ours}/mlp", f"{hf}.1.DenseReluDense", gated)]
  for i in range(num_decoder_layers):
    ours, hf = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
    links += [Link(f"{ours}/pre_self_attention_layer_norm/scale", f"{hf}.0.layer_norm.weight",
                   False),
              *_attention(f"{ours}/self_attention", f"{hf}.0.SelfAttention", qkvo),
              Link(f"{ours}/pre_cross_attention_layer_norm/scale", f"{hf}.1.layer_norm.weight",
                   False),
              *_attention(f"{ours}/encoder_decoder_attention", f"{hf}.1.EncDecAttention", qkvo),
              Link(f"{ours}/pre_mlp_layer_norm/scale", f"{hf}.2.layer_norm.weight", False),
              *_t5_mlp(f"{ours}/mlp", f"{hf}.2.DenseReluDense", gated)]
  if untied_head:
    links.append(Link("decoder/logits_dense/kernel", "lm_head.weight", True))
  return links


def llama_links(num_layers: int, untied_head: bool, qkv_bias: bool = False) -> list[Link]:
  """t5xlike `decoder.Transformer` <-> HF `LlamaForCausalLM` (see `models/decoder.py`;
  also Mistral's and Qwen2's names). With `qkv_bias` (Qwen2),
  `.../self_attention/{query,key,value}/bias` <-> `self_attn.{q,k,v}_proj.bias`."""
  links = [Link("token_embedder/embedding", "model.embed_tokens.weight", False),
           Link("decoder/decoder_norm/scale", "model.norm.weight", False)]
  for i in range(num_layers):
    ours, hf = f"decoder/layers_{i}", f"model.layers.{i}"
    links += [Link(f"{ours}/pre_self_attention_layer_norm/scale", f"{hf}.input_layernorm.weight",
                   False),
              *_attention(f"{ours}/self_attention", f"{hf}.self_attn",
                          ("q_proj", "k_proj", "v_proj", "o_proj")),
              Link(f"{ours}/pre_mlp_layer_norm/scale", f"{hf}.post_attention_layernorm.weight",
                   False),
              Link(f"{ours}/mlp/wi_0/kernel", f"{hf}.mlp.gate_proj.weight", True),
              Link(f"{ours}/mlp/wi_1/kernel", f"{hf}.mlp.up_proj.weight", True),
              Link(f"{ours}/mlp/wo/kernel", f"{hf}.mlp.down_proj.weight", True)]
    if qkv_bias:
      links += [Link(f"{ours}/self_attention/{o}/bias", f"{hf}.self_attn.{h}_proj.bias", False)
                for o, h in (("query", "q"), ("key", "k"), ("value", "v"))]
  if untied_head:
    links.append(Link("decoder/logits_dense/kernel", "lm_head.weight", True))
  return links

"""A Hugging Face model directory (`config.json` + weights + tokenizer model) as a
whole: which converter (`hf_t5` or `hf_llama`) it needs, reading and writing it."""
from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from t5xlike.interop import hf_llama, hf_t5, hf_weights, output_dir
from t5xlike.models import decoder, t5

CONFIG = "config.json"
#: The tokenizer model file names of T5 and Llama directories.
T5_SPM, LLAMA_SPM = "spiece.model", "tokenizer.model"


def read_config(directory: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(directory) / CONFIG
  if not path.is_file():
    raise ValueError(f"{directory} is not a Hugging Face model directory (no {CONFIG})")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: not JSON ({error.msg})") from None


def _converter(model_type: str | None):
  if model_type in hf_t5.MODEL_TYPES:
    return hf_t5
  if model_type in hf_llama.MODEL_TYPES:
    return hf_llama
  raise ValueError(f"{CONFIG}: model_type={model_type!r} is not supported (T5: "
                   f"{hf_t5.MODEL_TYPES}, decoder-only: {hf_llama.MODEL_TYPES})")


def read(directory: str | pathlib.Path, scan_layers: bool = False,
         sentencepiece_model: str | None = None) -> tuple[Any, Iterator[tuple[str, np.ndarray]],
                                                           output_dir.Vocabulary]:
  """(network config, (path, float32 array) pairs one at a time, vocabulary) of an HF dir.

  The vocabulary is `sentencepiece_model` if given, else the directory's
  `spiece.model` (T5, with 100 extra ids where the embedding has room) or
  `tokenizer.model` (Llama), else pass-through.
  """
  directory = pathlib.Path(directory)
  hf = read_config(directory)
  converter = _converter(hf.get("model_type"))
  network_config = converter.config_from_hf(hf, scan_layers=scan_layers)
  reader = hf_weights.WeightReader(directory)
  spm = sentencepiece_model
  if spm is None:
    candidate = directory / (T5_SPM if converter is hf_t5 else LLAMA_SPM)
    spm = str(candidate) if candidate.is_file() else None
  vocabulary = output_dir.Vocabulary()
  if spm:
    extra = (output_dir.t5_extra_ids(spm, network_config.vocab_size)
             if converter is hf_t5 else 0)
    vocabulary = output_dir.Vocabulary(spm, extra)
  return network_config, converter.import_params(reader, network_config), vocabulary


def write(directory: str | pathlib.Path, network_config: Any,
          flat: Mapping[str, np.ndarray], vocabulary: output_dir.Vocabulary,
          max_position_embeddings: int = 2048, model_type: str = "auto") -> pathlib.Path:
  """Writes `config.json`, `model.safetensors` (float32) and the SentencePiece model
  (`spiece.model` for T5, `tokenizer.model` for Llama) with a `tokenizer_config.json`.

  Args:
    directory: the Hugging Face model directory (created).
    network_config: a `t5.T5Config` or `decoder.DecoderConfig` (ValueError otherwise).
    flat: the unscanned parameters by '/'-joined t5xlike path (`layers_<i>`).
    vocabulary: where the token ids come from (the SentencePiece model is copied).
    max_position_embeddings: Llama's `max_position_embeddings` (RoPE has no table:
      the longest sequence the exported config announces).
    model_type: a decoder's HF family ('auto', 'llama', 'mistral', 'qwen2';
      `hf_llama.export_model_type`); T5 networks take 'auto' only.

  Returns:
    `directory`.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  if isinstance(network_config, t5.T5Config) and model_type != "auto":
    raise ValueError(f"--hf_model_type={model_type} is for decoder-only networks")
  if isinstance(network_config, t5.T5Config):
    hf, tensors = hf_t5.config_to_hf(network_config), hf_t5.export_params(flat, network_config)
    spm_name, tokenizer = T5_SPM, {"tokenizer_class": "T5Tokenizer",
                                   "extra_ids": vocabulary.extra_ids}
  elif isinstance(network_config, decoder.DecoderConfig):
    hf = hf_llama.config_to_hf(network_config, max_position_embeddings, model_type=model_type)
    tensors = hf_llama.export_params(flat, network_config)
    spm_name, tokenizer = LLAMA_SPM, {"tokenizer_class": "LlamaTokenizer"}
  else:
    raise ValueError(f"no Hugging Face export for {type(network_config).__name__}")
  hf_weights.write_safetensors(directory, tensors)
  (directory / CONFIG).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
  if vocabulary.sentencepiece_model:
    shutil.copyfile(vocabulary.sentencepiece_model, directory / spm_name)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2) + "\n")
  return directory

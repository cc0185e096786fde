"""LoRA parameters <-> a Hugging Face PEFT adapter directory (`adapter_config.json` +
`adapter_model.safetensors`), which `peft.PeftModel.from_pretrained(hf_base, directory)`
loads onto the base model's Hugging Face export (`python -m t5xlike.convert
--from=t5xlike --to=hf`).

PEFT's LoRA (peft 0.21, `tuners/lora/layer.py`) on a Linear `y = W x` adds
`s * B (A x)` with `A` (`lora_A.weight`) [r, in], `B` (`lora_B.weight`)
[out, r] and s = lora_alpha / r (`use_rslora`: lora_alpha / sqrt(r)); the saved
keys are `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, the
module named as in the base model's state dict
(`encoder.block.0.layer.0.SelfAttention.q`, `model.layers.0.self_attn.q_proj`).
t5xlike's LoRA (`finetuning/lora.py`) adds `(alpha / rank) x A B` to `x W`,
with `lora_a` [in, rank] and `lora_b` [rank, out] beside the kernel [in, out].
So PEFT's A and B are ours transposed, r is the rank, lora_alpha the alpha
(rsLoRA imports as alpha * sqrt(r), the same scale), and the module of a
kernel is the one `hf_names` links it to (the links of T5 and Llama-style
decoders, which name every parameter of those networks).

Only what both sides have is converted: LoRA on Linear layers, one rank and
one alpha, every layer of a stack (t5xlike's targets apply to every layer).
An adapter with other PEFT features (DoRA, per-module ranks, biases,
`modules_to_save`, ...) or whose weights do not fit the base (a module the
base lacks, another shape) is a ValueError naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import safetensors.numpy
from etils import epath

from t5xlike.interop import hf_llama, hf_names, hf_t5, param_trees
from t5xlike.models import t5

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The prefix of every saved key (PeftModel.base_model = LoraModel, its `.model` the HF model).
_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight")
_LAYER = re.compile(r"/layers_\d+(?=/|$)")
#: adapter_config.json keys of PEFT features t5xlike's LoRA lacks (refused when set).
_UNSUPPORTED = {
    "use_dora": "DoRA (magnitude vectors)", "lora_bias": "a bias on B",
    "fan_in_fan_out": "Conv1D-style [in, out] weights",
    "rank_pattern": "a rank per module", "alpha_pattern": "an alpha per module",
    "modules_to_save": "fully trained extra modules", "target_parameters": "LoRA on parameters",
    "layer_replication": "layer replication", "trainable_token_indices": "trained token rows",
    "use_qalora": "QALoRA", "use_bdlora": "block-diagonal LoRA"}
#: config.json keys that fix parameter shapes (compared with a named local base's).
_SHAPE_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
               "num_heads", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  """The `lora.LoRA` fields of an imported adapter.

  Attributes:
    rank: r.
    alpha: the alpha giving PEFT's scale as alpha / rank.
    dropout: lora_dropout.
    targets: a regex over t5xlike module paths matching exactly the adapted ones
      ('^(?:encoder/layers/attention/query|...)$').
  """
  rank: int
  alpha: float
  dropout: float
  targets: str


def links_of_params(names: Iterable[str]) -> tuple[str, list[hf_names.Link]]:
  """(PEFT task type, `hf_names` links) of a t5xlike T5 or decoder-only network from its
  unscanned parameter paths (LoRA's own ignored); ValueError when the parameters are not
  exactly those of a Hugging Face T5 / Llama-style model."""
  names = {n for n in names if not re.search(r"/lora_[ab]$", n)}
  if any(n.startswith("encoder/") for n in names):
    task = "SEQ_2_SEQ_LM"
    links = hf_names.t5_links(
        param_trees.count_layers(names, "encoder"), param_trees.count_layers(names, "decoder"),
        gated="encoder/layers_0/mlp/wi_0/kernel" in names,
        untied_head="decoder/logits_dense/kernel" in names,
        per_layer_relpos="encoder/layers_0/relpos_bias/rel_embedding" in names)
  else:
    task = "CAUSAL_LM"
    links = hf_names.llama_links(
        param_trees.count_layers(names, "decoder"),
        untied_head="decoder/logits_dense/kernel" in names,
        qkv_bias="decoder/layers_0/self_attention/query/bias" in names)
  ours = {link.ours for link in links}
  odd = sorted((ours - names) | (names - ours))
  if odd:
    raise ValueError(f"the network is not a Hugging Face T5 or Llama-style model "
                     f"({odd[0]} {'is missing' if odd[0] in ours else 'has no HF name'})")
  return task, links


def linear_modules(links: Iterable[hf_names.Link]) -> dict[str, str]:
  """{t5xlike module path ('encoder/layers_0/attention/query'): HF module name
  ('encoder.block.0.layer.0.SelfAttention.q')} of every linked kernel."""
  return {link.ours[:-len("/kernel")]: link.hf[:-len(".weight")] for link in links
          if link.ours.endswith("/kernel") and link.hf.endswith(".weight")}


def _target_modules(adapted: set[str], modules: Iterable[str]) -> list[str]:
  """PEFT's `target_modules`: the adapted modules' last name components ('q', 'v') when
  those select exactly the adapted modules, else their full names."""
  short = {name.rsplit(".", 1)[-1] for name in adapted}
  if adapted == {name for name in modules if name.rsplit(".", 1)[-1] in short}:
    return sorted(short)
  return sorted(adapted)


def write(directory: str | epath.Path, lora: Mapping[str, np.ndarray], param_names: Iterable[str],
          rank: int, alpha: float, dropout: float, base_model: str | None) -> epath.Path:
  """Writes `adapter_config.json` and `adapter_model.safetensors` into `directory`.

  Args:
    directory: an existing directory (local or remote, `epath`).
    lora: the unscanned LoRA parameters: `<module>/lora_a` [in, rank] and
      `<module>/lora_b` [rank, out] by t5xlike path.
    param_names: every unscanned parameter path of the network (the base's and LoRA's).
    rank, alpha, dropout: the `lora.LoRA` settings (PEFT's r, lora_alpha, lora_dropout).
    base_model: recorded as `base_model_name_or_path` (None: null).
  Returns:
    `directory`. ValueError when the network has no HF equivalent or LoRA sits on
    a parameter without an HF Linear.
  """
  task, links = links_of_params(param_names)
  modules = linear_modules(links)
  tensors: dict[str, np.ndarray] = {}
  for name in sorted(lora):
    path, which = name.rsplit("/", 1)
    if path not in modules:
      raise ValueError(f"{name}: LoRA on {path}, which is no Linear layer of the HF model")
    letter = {"lora_a": "A", "lora_b": "B"}[which]
    tensors[f"{_PREFIX}{modules[path]}.lora_{letter}.weight"] = np.ascontiguousarray(
        np.asarray(lora[name], np.float32).T)
  adapted = {key[len(_PREFIX):-len(".lora_A.weight")] for key in tensors
             if key.endswith(".lora_A.weight")}
  config = {
      "peft_type": "LORA", "task_type": task, "r": int(rank), "lora_alpha": float(alpha),
      "lora_dropout": float(dropout), "use_rslora": False,
      "target_modules": _target_modules(adapted, modules.values()),
      "bias": "none", "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True,
      "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
      "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
      "base_model_name_or_path": base_model, "revision": None}
  directory = epath.Path(directory)
  (directory / ADAPTER_WEIGHTS).write_bytes(
      safetensors.numpy.save(tensors, metadata={"format": "pt"}))
  (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return directory


def read_config(directory: str | epath.Path) -> dict[str, Any]:
  """The adapter_config.json of a PEFT adapter directory, checked to be a LoRA that
  t5xlike's LoRA can run (ValueError naming the key otherwise)."""
  path = epath.Path(directory) / ADAPTER_CONFIG
  if not path.exists():
    raise ValueError(f"{directory} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: not JSON ({error.msg})") from None
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{ADAPTER_CONFIG}: peft_type={config.get('peft_type')!r}: only LORA "
                     "adapters import")
  for key, feature in _UNSUPPORTED.items():
    if config.get(key):
      raise ValueError(f"{ADAPTER_CONFIG}: {key}={json.dumps(config[key])}: t5xlike's LoRA "
                       f"has no {feature}")
  if not isinstance(config.get("r"), int) or config["r"] <= 0:
    raise ValueError(f"{ADAPTER_CONFIG}: r={config.get('r')!r} is no positive rank")
  if config.get("bias", "none") != "none":
    raise ValueError(f"{ADAPTER_CONFIG}: bias={config['bias']!r}: t5xlike's LoRA trains no "
                     "biases")
  return config


def _hf_config(network_config: Any) -> dict[str, Any]:
  if isinstance(network_config, t5.T5Config):
    return hf_t5.config_to_hf(network_config)
  return hf_llama.config_to_hf(network_config)


def _family(model_type: str | None) -> str | None:
  """'t5' (T5, mT5, umT5), 'decoder' (Llama, Mistral, Qwen2) or the model_type itself."""
  if model_type in hf_t5.MODEL_TYPES:
    return "t5"
  return "decoder" if model_type in hf_llama.MODEL_TYPES else model_type


def check_named_base(config: Mapping[str, Any], network_config: Any, base: str) -> str | None:
  """Compares the adapter's `base_model_name_or_path`, where it is a local Hugging Face
  model directory, with the base network (the keys that fix shapes; ValueError naming
  the first that differs); returns what was not checked (a hub name, a path not here,
  a t5xlike checkpoint), or None."""
  named = config.get("base_model_name_or_path")
  if not named:
    return None
  hf_config = epath.Path(named) / "config.json"
  if not hf_config.exists():
    return f"base_model_name_or_path={named!r} is no local Hugging Face model: not compared"
  theirs = json.loads(hf_config.read_text())
  ours = _hf_config(network_config)
  if _family(theirs.get("model_type")) != _family(ours["model_type"]):
    raise ValueError(f"{ADAPTER_CONFIG}: base_model_name_or_path={named} is a "
                     f"{theirs.get('model_type')} model, the base {base} a {ours['model_type']}")
  for key in _SHAPE_KEYS:
    if key in theirs and key in ours and theirs[key] is not None and theirs[key] != ours[key]:
      raise ValueError(f"{ADAPTER_CONFIG}: base_model_name_or_path={named} has {key}="
                       f"{theirs[key]}, the base {base} {key}={ours[key]}")
  return None


def read(directory: str | epath.Path, param_shapes: Mapping[str, tuple[int, ...]],
         base: str) -> tuple[LoraSettings, dict[str, np.ndarray]]:
  """The LoRA settings and unscanned t5xlike LoRA parameters of a PEFT adapter.

  Args:
    directory: holds adapter_config.json and adapter_model.safetensors.
    param_shapes: the base network's unscanned {path: shape}
      (`network_shapes.param_shapes`).
    base: the base checkpoint as named in errors.
  Returns:
    (settings, {'<module>/lora_a': [in, r], '<module>/lora_b': [r, out]} float32).
  Raises:
    ValueError (one line naming the key): not a LoRA t5xlike can run, or an adapter of
    another base (a module the base lacks, another shape, some layers only, another
    task type).
  """
  config = read_config(directory)
  task, links = links_of_params(param_shapes)
  if config.get("task_type") in ("SEQ_2_SEQ_LM", "CAUSAL_LM") and config["task_type"] != task:
    raise ValueError(f"{ADAPTER_CONFIG}: task_type={config['task_type']}, but the base {base} "
                     f"is a {task} model")
  rank = int(config["r"])
  modules = linear_modules(links)
  ours_of = {hf: ours for ours, hf in modules.items()}
  weights = epath.Path(directory) / ADAPTER_WEIGHTS
  if not weights.exists():
    raise ValueError(f"{directory} has no {ADAPTER_WEIGHTS}")
  lora: dict[str, np.ndarray] = {}
  for key, value in sorted(safetensors.numpy.load(weights.read_bytes()).items()):
    match = _KEY.fullmatch(key)
    if not match:
      raise ValueError(f"{ADAPTER_WEIGHTS}: {key} is no LoRA A or B weight of a Linear layer")
    module = ours_of.get(match["module"])
    if module is None:
      raise ValueError(f"{ADAPTER_WEIGHTS}: {key}: the base {base} has no Linear layer "
                       f"{match['module']} (an adapter of another model)")
    fan_in, fan_out = param_shapes[f"{module}/kernel"]
    wanted = (rank, fan_in) if match["which"] == "A" else (fan_out, rank)
    if tuple(value.shape) != wanted:
      raise ValueError(f"{ADAPTER_WEIGHTS}: {key} has shape {tuple(value.shape)}, the base "
                       f"{base} wants {wanted} (r={rank}; an adapter of another model)")
    lora[f"{module}/lora_{match['which'].lower()}"] = np.ascontiguousarray(
        value.astype(np.float32).T)
  if not lora:
    raise ValueError(f"{ADAPTER_WEIGHTS} holds no LoRA weight")
  adapted = {name.rsplit("/", 1)[0] for name in lora}
  for module in sorted(adapted):
    for which in ("lora_a", "lora_b"):
      if f"{module}/{which}" not in lora:
        raise ValueError(f"{ADAPTER_WEIGHTS}: {_PREFIX}{modules[module]} has no "
                         f"lora_{which[-1].upper()}")
  collapsed = sorted({_LAYER.sub("/layers", module) for module in adapted})
  for kind in collapsed:
    every = {m for m in modules if _LAYER.sub("/layers", m) == kind}
    missing = sorted(every - adapted)
    if missing:
      raise ValueError(f"{ADAPTER_WEIGHTS}: no LoRA on {modules[missing[0]]}: t5xlike's "
                       f"LoRA adapts a module in every layer of its stack")
  alpha = float(config.get("lora_alpha", 8))
  if config.get("use_rslora"):
    alpha *= math.sqrt(rank)  # alpha' / r == alpha / sqrt(r).
  targets = "^(?:" + "|".join(re.escape(kind) for kind in collapsed) + ")$"
  return LoraSettings(rank, alpha, float(config.get("lora_dropout") or 0.0), targets), lora


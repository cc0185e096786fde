"""Fine-tuning techniques, plugged into one trainer through one protocol.

`base`: the protocol (`wrap_optimizer`, `trainable`, `initialize`,
`describe`, `apply_updates`, `export`) that `train_run.train(finetuning=...)`
and the `Trainer` call, and `Combine`. `selection`: parameter groups (path
regex + layer indices) -> per-leaf / per-layer masks and depths, scanned and
unscanned alike. `updates`: the optax wrapper (per-layer update scales;
frozen parameters without optimizer state). Techniques: `freezing` (Freeze,
FreezeLower), `llrd` (LayerwiseDecay), `reinit` (ReinitTop), `hft`
(HalfFineTuning), `sparse` (SparseFineTuning, LT-SFT) with `sparse_delta`
(its exported deltas: apply, compose); parameter-efficient (`peft`: the model
wrapper, `peft.wrap_model`): `lora` (LoRA, merge_lora), `adapters`
(Adapters), `prompt_tuning` (PromptTuning),
`dept` (DePT: a shorter prompt and a low-rank update of the input embeddings),
`dsee` (DSEE: low-rank plus sparse weight updates), `intrinsic`
(IntrinsicDimension: d numbers projected by `fastfood` into the parameters),
their checkpoints `peft_checkpoint` and `peft_registry` (each technique registers
itself there by name; importing this package registers them all). `merging`
(soups, task arithmetic, Model Breadcrumbs) and `merge_run` are
`python -m t5xlike.merge`.
Gin: `gin_configs/finetune/{freeze_lower,llrd,reinit_top,hft,sparse_ft,lora,
adapters,prompt_tuning,dept,dsee,intrinsic_dim}.gin`, `gin_configs/runs/{merge,greedy_soup}.gin`.
"""
from t5xlike.finetuning.adapters import Adapters
from t5xlike.finetuning.base import Combine, FineTuning
from t5xlike.finetuning.dept import DePT
from t5xlike.finetuning.dsee import DSEE
from t5xlike.finetuning.freezing import Freeze, FreezeLower
from t5xlike.finetuning.hft import HalfFineTuning
from t5xlike.finetuning.intrinsic import IntrinsicDimension
from t5xlike.finetuning.llrd import LayerwiseDecay
from t5xlike.finetuning.lora import LoRA, merge_lora
from t5xlike.finetuning.peft import PeftMethod, wrap_model
from t5xlike.finetuning.prompt_tuning import PromptTuning
from t5xlike.finetuning.reinit import ReinitTop
from t5xlike.finetuning.selection import Group
from t5xlike.finetuning.sparse import SparseFineTuning

__all__ = [
    "Adapters",
    "Combine",
    "DePT",
    "DSEE",
    "FineTuning",
    "Freeze",
    "FreezeLower",
    "Group",
    "HalfFineTuning",
    "IntrinsicDimension",
    "LayerwiseDecay",
    "LoRA",
    "PeftMethod",
    "PromptTuning",
    "ReinitTop",
    "SparseFineTuning",
    "merge_lora",
    "wrap_model",
]

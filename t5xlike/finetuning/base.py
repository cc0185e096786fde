"""The fine-tuning protocol the trainer and `train_run.train` call, and its base class.

`train_run.train(..., finetuning=F)` (gin: `train_run.train.finetuning =
@<technique>()`) hands F to the `Trainer`, which calls, once the parameter
tree exists (`Trainer._prepare_init`, boxed abstract parameters with their
logical axes):

  F.wrap_optimizer(optimizer, params) -> optax.GradientTransformation
      `optimizer` is the run's optimizer, already made per-layer for scanned
      stacks (`optim.per_layer`); the result replaces it (its state is what
      checkpoints hold).
  F.trainable(params) -> mask tree (`selection`: bool arrays of shape (),
      [L] for scanned leaves, or any leading-axes shape)
      Parameters outside it get no gradient (`stop_gradient` in the train
      step, so XLA skips their weight gradients and `grad_norm` counts
      the trainable ones only); startup logs trainable vs total counts.

  F.apply_updates(params, updates, opt_state) -> params
      How each train step applies the optimizer's updates (`opt_state` is
      the new optimizer state); default `optax.apply_updates`. Sparse
      fine-tuning writes the initial values back exactly there.

and `train_run.train` calls, once, when a run starts from
INITIAL_CHECKPOINT_PATH (never when it resumes from MODEL_DIR):

  F.initialize(params, fresh, restored) -> params
      `params`: the starting parameters; `fresh()`: a new initialisation of
      the whole model from RANDOM_SEED (same tree, same shardings);
      `restored`: the '/'-joined paths of the parameters that came from the
      checkpoint (the others were initialised from RANDOM_SEED: a task head,
      a technique's new parameters), so that a technique initialises its own
      parameters only where the checkpoint did not hold them.

  F.describe(params) -> list[str]: lines for the startup log.

and, once training has reached TRAIN_STEPS, on every process (orbax saves
together):

  F.export(params, model_dir, step, base_checkpoint) -> list[epath.Path]
      Writes what the technique leaves beside the run's own checkpoints (a
      PEFT checkpoint of the trained parameters only, a sparse delta, merged
      LoRA weights...) under `model_dir`; `base_checkpoint` is
      INITIAL_CHECKPOINT_PATH (or None). Returns the directories written
      (logged). The default writes nothing.

`FineTuning` implements all four from one method, `update_scales(params)`
(see `updates.scaled`: per-leaf / per-layer learning-rate multipliers, 0 =
frozen); techniques override it and/or `initialize`. `Combine` stacks
techniques (scales multiply, initialisations run in order). Techniques that
add parameters (LoRA, adapters, prompts) change the model; the restore of
INITIAL_CHECKPOINT_PATH initialises their new parameters from RANDOM_SEED
(`checkpoints.restore_matching_params`), and freezing the rest is
`Freeze(train_only=...)`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from t5xlike.finetuning import selection, updates


class FineTuning:
  """Full fine-tuning: every parameter trained at the run's learning rate."""

  def update_scales(self, params: Any) -> Any:
    """Learning-rate multipliers: float arrays of shape () / [L] per leaf."""
    return jax.tree.map(lambda leaf: np.ones(leaf.mask_shape, np.float32),
                        selection.leaves(params),
                        is_leaf=lambda x: isinstance(x, selection.Leaf))

  def trainable(self, params: Any) -> Any:
    return jax.tree.map(lambda s: np.asarray(s) != 0, self.update_scales(params))

  def wrap_optimizer(self, optimizer: optax.GradientTransformation,
                     params: Any) -> optax.GradientTransformation:
    return updates.scaled(optimizer, self.update_scales(params))

  def apply_updates(self, params: Any, updates: Any, opt_state: Any) -> Any:
    del opt_state
    return optax.apply_updates(params, updates)

  def initialize(self, params: Any, fresh: Callable[[], Any], restored: frozenset[str]) -> Any:
    del fresh, restored
    return params

  def describe(self, params: Any) -> list[str]:
    del params
    return [repr(self)]

  def export(self, params: Any, model_dir: Any, step: int,
             base_checkpoint: str | None) -> list[Any]:
    del params, model_dir, step, base_checkpoint
    return []


@dataclasses.dataclass(frozen=True)
class Combine(FineTuning):
  """Several techniques at once: scales multiply, `initialize` runs in order."""
  techniques: Sequence[FineTuning] = ()

  def update_scales(self, params):
    out = FineTuning().update_scales(params)
    for technique in self.techniques:
      out = jax.tree.map(np.multiply, out, technique.update_scales(params))
    return out

  def initialize(self, params, fresh, restored):
    for technique in self.techniques:
      params = technique.initialize(params, fresh, restored)
    return params

  def describe(self, params):
    return [line for t in self.techniques for line in t.describe(params)]

  def export(self, params, model_dir, step, base_checkpoint):
    return [path for t in self.techniques
            for path in t.export(params, model_dir, step, base_checkpoint)]


def where(mask: Any, new: Any, old: Any) -> Any:
  """Per leaf: `new` where the (per-layer) mask is set, else `old`."""
  def pick(m, a, b):
    m = np.asarray(m, bool)
    if m.all():
      return a
    if not m.any():
      return b
    return jax.numpy.where(selection.expand(m, np.ndim(b)), a, b)
  return jax.tree.map(pick, mask, new, old)

"""A frozen second model beside the trained one: the DPO reference, the distillation teacher.

One mechanism for both (`interfaces.HoldsFrozenModel`). The model wrapper
(`PairedModel`: `preference.PreferenceModel`, `distillation.DistillationModel`)
holds the trained model and a frozen one in one parameter tree:

  token_embedder/..., encoder/..., decoder/...   the trained model, plain paths
  reference/token_embedder/..., ...              the frozen model under its name

so a run's checkpoints load with the trained model's own gin in eval, infer and
convert (they restore the parameters they know), the frozen model is sharded
like the trained one (same logical axis rules), and a resume restores both
bit for bit. The run:

- `technique(model, finetuning)` wraps the run's fine-tuning technique (None:
  full fine-tuning) in `KeepFrozen`: the frozen subtree gets no gradient
  (`trainable` is False there), no optimizer state and updates of -0.0
  (`optax.multi_transform` routes it to `finetuning.updates.frozen`), so it
  stays bit-identical; the technique sees the whole tree otherwise and
  composes (LoRA on the policy, layer-wise rates, freezing...);
- `check_model` / `check_checkpoint` (from `runs/train_plan.py`, before
  anything is written): the frozen model reads the same token ids (same
  embedding rows and vocabulary size) and its checkpoint holds its
  architecture (every path, every shape); a ConfigError naming the culprit
  otherwise;
- `load_frozen` (from `runs/initial_state.py`, when a run starts, never on a
  resume): the subtree is restored from `frozen_checkpoint_path`, or from
  INITIAL_CHECKPOINT_PATH when that is None (the DPO reference: a copy of the
  starting policy), matching the checkpoint's plain paths.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, cast

import flax.linen as nn
import jax
import numpy as np
import optax

from t5xlike import checkpoints, errors, interfaces
from t5xlike.finetuning import updates
from t5xlike.inference import decoding

log = logging.getLogger(__name__)
Batch = Mapping[str, Any]

_TRAINED, _FROZEN = "trained", "frozen"


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def holds_frozen(model: Any) -> bool:
  """Whether `model` holds a frozen second model in its parameter tree."""
  return isinstance(model, interfaces.HoldsFrozenModel) and model.frozen is not None


def trained_part(model: Any, params: Mapping[str, Any]) -> dict[str, Any]:
  """The trained model's parameters: `params` without the frozen subtree."""
  if not holds_frozen(model):
    return dict(params)
  return {k: v for k, v in params.items() if k != model.frozen_name}


def trained_paths(model: Any, paths: list[str]) -> list[str]:
  """The parameter paths ('a/b/kernel') of `paths` outside the frozen subtree."""
  if not holds_frozen(model):
    return paths
  return [path for path in paths if not path.startswith(model.frozen_name + "/")]


def frozen_source(model: interfaces.HoldsFrozenModel) -> str:
  """Where the frozen parameters come from, for messages."""
  path = model.frozen_checkpoint_path
  return f"{model.frozen_name} checkpoint {path}" if path else "INITIAL_CHECKPOINT_PATH"


class PairedModel:
  """Base class of the models that hold a trained model and a frozen one.

  Members of `interfaces.Model` other than `init`, `loss_fn` and `metrics` are
  the trained model's; `DecodingModel` members decode and score with the
  trained model's parameters (a distilled student generates like itself).

  Args:
    trained: the model trained (the policy, the student).
    frozen: the frozen model (the reference, the teacher), or None.
    frozen_name: the top-level key of its parameters.
    frozen_checkpoint_path: where they come from (None: INITIAL_CHECKPOINT_PATH).
  """

  def __init__(self, trained: interfaces.Model, frozen: interfaces.Model | None,
               frozen_name: str, frozen_checkpoint_path: str | None = None):
    if not frozen_name or "/" in frozen_name:
      raise ValueError(f"frozen_name must be a plain name, got {frozen_name!r}")
    self.trained = trained
    self._frozen = frozen
    self._frozen_name = frozen_name
    self._frozen_checkpoint_path = frozen_checkpoint_path or None

  # -- interfaces.HoldsFrozenModel ------------------------------------------------------------
  @property
  def frozen(self) -> interfaces.Model | None:
    return self._frozen

  @property
  def frozen_name(self) -> str:
    return self._frozen_name

  @property
  def frozen_checkpoint_path(self) -> str | None:
    return self._frozen_checkpoint_path

  # -- the trained model's members ------------------------------------------------------------
  @property
  def vocabulary(self) -> Any:
    return self.trained.vocabulary

  @property
  def vocab_size(self) -> int:
    return self.trained.vocab_size

  @property
  def network(self) -> Any:
    return self.trained.network

  @property
  def peft_method(self) -> interfaces.FineTuningTechnique | None:
    return self.trained.peft_method

  def model_batch(self, batch: Batch) -> Batch:
    """The features both models read for `batch` (shapes for `init`); subclasses with
    their own batch layout (pairwise) override it."""
    return batch

  def init(self, rng: jax.Array, batch: Batch) -> Any:
    """{'params': the trained model's parameters plus the frozen model's under `frozen_name`}
    (logically boxed), for batches of these shapes."""
    trained_rng, frozen_rng = jax.random.split(rng)
    features = self.model_batch(batch)
    params = dict(self.trained.init(trained_rng, features)["params"])
    if self._frozen is not None:
      if self._frozen_name in params:
        raise ValueError(f"the trained model has a top-level parameter group "
                         f"{self._frozen_name!r}: choose another frozen_name")
      params[self._frozen_name] = self._frozen.init(frozen_rng, features)["params"]
    return {"params": params}

  def split(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """(the trained model's parameters, the frozen model's or None)."""
    if self._frozen is None:
      return dict(params), None
    return ({k: v for k, v in params.items() if k != self._frozen_name},
            params[self._frozen_name])

  # -- decoding with the trained model (interfaces.DecodingModel) ------------------------------
  def _decoding(self) -> interfaces.DecodingModel:
    # A trained model that does not decode (an MLM student) raises AttributeError on use.
    return cast(interfaces.DecodingModel, self.trained)

  @property
  def weight_feature(self) -> str:
    return self._decoding().weight_feature

  def score_batch(self, params: Any, batch: Batch) -> jax.Array:
    """The trained model's `score_batch` with its own parameters."""
    return self._decoding().score_batch(self.split(params)[0], batch)

  def predict_batch(self, params: Any, batch: Batch, config: decoding.DecodingConfig,
                    max_length: int, eos_id: int,
                    rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The trained model's `predict_batch` with its own parameters.

    Args:
      params: the whole parameter tree (the frozen subtree is left out).
      batch: the rows' features.
      config: how each next token is chosen.
      max_length: tokens generated at most per row.
      eos_id: the token that ends a row.
      rng: the key of method 'sample' (None otherwise).
    """
    return self._decoding().predict_batch(self.split(params)[0], batch, config, max_length,
                                          eos_id, rng=rng)


@dataclasses.dataclass(frozen=True)
class KeepFrozen:
  """The run's fine-tuning technique with one top-level subtree kept frozen
  (`interfaces.FineTuningTechnique`; see the module docstring).

  Attributes:
    name: the frozen subtree's top-level key.
    source: where its values come from (logged).
    inner: the run's own technique (None: every other parameter trains).
  """
  name: str
  source: str
  inner: interfaces.FineTuningTechnique | None = None

  def wrap_optimizer(self, optimizer: optax.GradientTransformation,
                     params: Any) -> optax.GradientTransformation:
    inner = optimizer if self.inner is None else self.inner.wrap_optimizer(optimizer, params)
    labels = {key: jax.tree.map(lambda _, key=key: _FROZEN if key == self.name else _TRAINED,
                                value, is_leaf=_is_box) for key, value in params.items()}
    # The frozen leaves reach `inner` as optax.MaskedNode: no state is allocated for them.
    return optax.multi_transform({_TRAINED: inner, _FROZEN: updates.frozen()}, labels)

  def trainable(self, params: Any) -> Any:
    if self.inner is None:
      mask = jax.tree.map(lambda _: np.ones((), bool), params, is_leaf=_is_box)
    else:
      mask = dict(self.inner.trainable(params))
    mask[self.name] = jax.tree.map(lambda _: np.zeros((), bool), params[self.name],
                                   is_leaf=_is_box)
    return mask

  def apply_updates(self, params: Any, updates_: Any, opt_state: Any) -> Any:
    if self.inner is None:
      return optax.apply_updates(params, updates_)
    return self.inner.apply_updates(params, updates_, opt_state)

  def initialize(self, params: Any, fresh: Callable[[], Any], restored: frozenset[str]) -> Any:
    return params if self.inner is None else self.inner.initialize(params, fresh, restored)

  def describe(self, params: Any) -> list[str]:
    count = sum(int(np.prod(shape))
                for shape in checkpoints.flat_shapes(params[self.name]).values())
    lines = [f"{self.name}: {count:,} parameters frozen (no gradient, no optimizer state), "
             f"from {self.source}"]
    return lines + (self.inner.describe(params) if self.inner is not None else [])

  def export(self, params: Any, model_dir: Any, step: int,
             base_checkpoint: str | None) -> list[Any]:
    if self.inner is None:
      return []
    return self.inner.export(params, model_dir, step, base_checkpoint)


def technique(model: Any, finetuning: interfaces.FineTuningTechnique | None
              ) -> interfaces.FineTuningTechnique | None:
  """The technique a run trains `model` with: `finetuning` itself, or, for a model that
  holds a frozen one, `finetuning` with the frozen subtree kept frozen."""
  if not holds_frozen(model):
    return finetuning
  return KeepFrozen(model.frozen_name, frozen_source(model), finetuning)


def check_model(model: Any) -> None:
  """ConfigError when the frozen model cannot read the trained model's token ids (another
  vocabulary: a different embedding table or vocabulary size)."""
  if not holds_frozen(model):
    return
  frozen, name = model.frozen, model.frozen_name
  # (A seqio vocabulary's size; None for a model with token ids only.)
  trained_pieces = getattr(model.vocabulary, "vocab_size", None)
  frozen_pieces = getattr(frozen.vocabulary, "vocab_size", None)
  trained_rows, frozen_rows = model.vocab_size, frozen.vocab_size
  if trained_rows != frozen_rows or (None not in (trained_pieces, frozen_pieces)
                                     and trained_pieces != frozen_pieces):
    raise errors.ConfigError(
        f"the {name} model has another vocabulary than the trained model: "
        f"{frozen_pieces} tokens in {frozen_rows} embeddings vs {trained_pieces} in "
        f"{trained_rows} (both must read the same token ids)")


def check_checkpoint(model: Any, initial_checkpoint_path: str | None,
                     abstract_params: Mapping[str, Any]) -> None:
  """ConfigError (one line) when the frozen model's checkpoint is unset, not a step
  directory, or holds another architecture (a path missing, or of another shape)."""
  if not holds_frozen(model):
    return
  name = model.frozen_name
  path = model.frozen_checkpoint_path or initial_checkpoint_path
  what = (f"the {name} checkpoint {path}" if model.frozen_checkpoint_path
          else f"INITIAL_CHECKPOINT_PATH={path} (the {name} model's parameters)")
  if not path:
    raise errors.ConfigError(f"the {name} model starts as a copy of the starting model: set "
                             f"INITIAL_CHECKPOINT_PATH (or the {name} model's own checkpoint)")
  try:
    saved = checkpoints.saved_param_shapes(checkpoints.validate_step_dir(path))
  except ValueError as error:
    raise errors.ConfigError(f"{what}: {errors.one_line(error)}") from None
  wanted = checkpoints.flat_shapes(abstract_params[name])
  problems = [f"{p}: checkpoint {saved[p]} vs model {s}"
              for p, s in wanted.items() if p in saved and saved[p] != s]
  problems += [f"{p} not in the checkpoint" for p in sorted(set(wanted) - set(saved))]
  if problems:
    more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
    raise errors.ConfigError(f"{what} holds another architecture than the {name} model: "
                             f"{'; '.join(problems[:2])}{more}")


def load_frozen(model: Any, params: Mapping[str, Any], abstract_params: Mapping[str, Any],
                initial_checkpoint_path: str | None) -> Any:
  """`params` with the frozen subtree restored from its checkpoint (plain paths), laid
  out as `abstract_params` says; `params` itself for a model without one."""
  if not holds_frozen(model):
    return params
  name = model.frozen_name
  path = model.frozen_checkpoint_path or initial_checkpoint_path
  restored, missing = checkpoints.restore_matching_params(path, abstract_params[name])
  if missing:  # (checked by `check_checkpoint` before anything was written)
    raise errors.ConfigError(f"{frozen_source(model)} lacks {', '.join(missing[:3])}")
  log.info("%s: parameters restored from %s (frozen)", name, path)
  return {**params, name: restored}

"""The t5xlike side of a conversion: write or read a t5xlike model directory.

Written (docs/architecture.md, "Contracts users rely on"):
  OUT/checkpoint/state   an orbax step directory `{step: 0, params}` (as
                         `checkpoints.save_params` writes), accepted by
                         CHECKPOINT_PATH and INITIAL_CHECKPOINT_PATH;
  OUT/model.gin          MODEL, the network config (and its scan setting) and
                         VOCABULARY: the source's SentencePiece model copied to
                         OUT/ (referenced by absolute path), else a pass-through
                         vocabulary of the model's size (ids only, EOS 1);
so `--gin_file=OUT/model.gin --gin_file=gin_configs/runs/infer.gin
--gin.CHECKPOINT_PATH=OUT/checkpoint` loads it.
Read: a step directory plus a gin file that binds its MODEL (`locate`): OUT
itself (OUT/checkpoint, OUT/model.gin), a step directory with model.gin
beside it, or a training run's MODEL_DIR/checkpoint_<N> with the run's
operative MODEL_DIR/config.gin beside it.
"""
from __future__ import annotations

import dataclasses
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import gin
import jax
import numpy as np
import sentencepiece

from t5xlike import checkpoints
from t5xlike.interop import network_shapes, param_trees
from t5xlike.models import decoder, t5

CHECKPOINT = "checkpoint"
MODEL_GIN = "model.gin"
#: The operative config a training run writes in MODEL_DIR (`runs/train_run.py`).
RUN_CONFIG_GIN = "config.gin"
T5_EXTRA_IDS = 100


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Where a converted model's token ids come from.

  Attributes:
    sentencepiece_model: path of a SentencePiece `.model` file, or None
      (pass-through: ids only).
    extra_ids: sentinel ids appended after the pieces (T5: 100).
  """
  sentencepiece_model: str | None = None
  extra_ids: int = 0


def t5_extra_ids(sentencepiece_model: str, vocab_size: int) -> int:
  """T5's 100 extra ids when the embedding has room for them after the pieces, else 0."""
  pieces = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model).get_piece_size()
  return T5_EXTRA_IDS if pieces + T5_EXTRA_IDS <= vocab_size else 0


def _value(value: Any) -> str:
  return repr(tuple(value)) if isinstance(value, (list, tuple)) else repr(value)


#: The loss settings a model gin binds when the caller gives none (T5X's defaults).
DEFAULT_MODEL_OPTIONS: Mapping[str, Any] = {"z_loss": 1e-4, "label_smoothing": 0.0}


def _model_classes(network_config: Any) -> tuple[str, str, str, list[str]]:
  """(model, network, config) gin names of a network config, and their imports."""
  if isinstance(network_config, t5.T5Config):
    model, network, module = "encoder_decoder.EncoderDecoderModel", "t5.Transformer", "t5.T5Config"
    imports = ["from t5xlike.models import encoder_decoder", "from t5xlike.models import t5"]
  elif isinstance(network_config, decoder.DecoderConfig):
    model, network = "decoder.DecoderOnlyModel", "decoder.Transformer"
    module = "decoder.DecoderConfig"
    imports = ["from t5xlike.models import decoder"]
  else:
    raise TypeError(f"no gin for {type(network_config).__name__}")
  return model, network, module, imports


def _model_lines(network_config: Any, model_options: Mapping[str, Any] | None,
                 macro: str, scope: str) -> list[str]:
  """`macro = @scope/model()` and its bindings in `scope` (the network config's fields,
  VOCABULARY, the loss settings)."""
  model, network, module, _ = _model_classes(network_config)
  fields = [f"  {name} = {_value(value)}"
            for name, value in dataclasses.asdict(network_config).items()]
  options = DEFAULT_MODEL_OPTIONS if model_options is None else model_options
  return [f"{macro} = @{scope}{model}()", f"{scope}{model}:", f"  network = @{scope}{network}()",
          "  vocabulary = %VOCABULARY",
          *(f"  {name} = {_value(value)}" for name, value in options.items()), "",
          f"{scope}{network}.config = @{scope}{module}()", f"{scope}{module}:", *fields, ""]


def model_gin(network_config: Any, vocabulary_lines: list[str], written_by: str = "convert",
              model_options: Mapping[str, Any] | None = None) -> str:
  """The gin text binding MODEL to this network config and VOCABULARY; `model_options`
  are the model's other arguments (its loss settings; default DEFAULT_MODEL_OPTIONS),
  `written_by` the command named in its first line."""
  imports = _model_classes(network_config)[3]
  return "\n".join([
      f"# Written by `python -m t5xlike.{written_by}`.", "from __gin__ import dynamic_registration",
      "", *imports, "from seqio import vocabularies", "", *vocabulary_lines, "",
      *_model_lines(network_config, model_options, "MODEL", "")])


def teacher_gin(network_config: Any, checkpoint_path: str, written_by: str,
                model_options: Mapping[str, Any] | None = None) -> str:
  """The gin text binding TEACHER (in scope `teacher/`, VOCABULARY shared with MODEL) to
  this network config and TEACHER_CHECKPOINT_PATH to `checkpoint_path`: the unpruned
  source of a pruned model, for `posttrain/distill_pruned.gin`."""
  imports = _model_classes(network_config)[3]
  return "\n".join([
      f"# Written by `python -m t5xlike.{written_by}`: the unpruned source as the teacher.",
      "from __gin__ import dynamic_registration", "", *imports, "",
      f"TEACHER_CHECKPOINT_PATH = {str(checkpoint_path)!r}",
      *_model_lines(network_config, model_options, "TEACHER", "teacher/")])


def vocabulary_gin(vocabulary: Vocabulary, copied: pathlib.Path | None, size: int) -> list[str]:
  if copied is None:
    return ["# No SentencePiece model in the source: token ids pass through.",
            "VOCABULARY = @vocabularies.PassThroughVocabulary()",
            "vocabularies.PassThroughVocabulary:", f"  size = {size}", "  eos_id = 1"]
  return ["VOCABULARY = @vocabularies.SentencePieceVocabulary()",
          "vocabularies.SentencePieceVocabulary:",
          f"  sentencepiece_model_file = {str(copied.resolve())!r}",
          f"  extra_ids = {vocabulary.extra_ids}"]


def write(output: str | pathlib.Path, network_config: Any, flat: Mapping[str, np.ndarray],
          vocabulary: Vocabulary, final: str | pathlib.Path | None = None,
          written_by: str = "convert",
          model_options: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes OUT/checkpoint (step 0) and OUT/model.gin.

  Args:
    output: OUT (created).
    network_config: a `t5.T5Config` or `decoder.DecoderConfig`.
    flat: the unscanned parameters (`layers_<i>`) by '/'-joined path; stacked
      here when the config scans its layers.
    vocabulary: where the token ids come from (a SentencePiece model is copied to OUT).
    final: the directory OUT will be renamed to (model.gin names the copied
      SentencePiece model by its final path); None: OUT itself.
    written_by: the command named in model.gin's first line.
    model_options: the model's loss settings bound in model.gin (`model_gin`).

  Returns:
    OUT.
  """
  output = pathlib.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  copied = None
  if vocabulary.sentencepiece_model:
    copied = output / pathlib.Path(vocabulary.sentencepiece_model).name
    shutil.copyfile(vocabulary.sentencepiece_model, copied)
  params = param_trees.stack(flat) if network_config.scan_layers else dict(flat)
  checkpoints.save_params_at(output / CHECKPOINT, 0, param_trees.unflatten(params))
  named = pathlib.Path(final or output) / copied.name if copied else None
  text = model_gin(network_config, vocabulary_gin(vocabulary, named, network_config.vocab_size),
                   written_by, model_options)
  (output / MODEL_GIN).write_text(text)
  return output


def locate(checkpoint: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
  """(the step directory, the gin file beside it that binds MODEL, or None) of
  `--checkpoint`: a convert output OUT (OUT/checkpoint, OUT/model.gin), a step
  directory with `model.gin` beside it, or one with a training run's `config.gin`
  beside it (MODEL_DIR/checkpoint_<N>: the operative config holds MODEL's bindings)."""
  checkpoint = pathlib.Path(checkpoint)
  if (checkpoint / CHECKPOINT).is_dir() and (checkpoint / MODEL_GIN).is_file():
    return checkpoint / CHECKPOINT, checkpoint / MODEL_GIN
  parent = checkpoint.resolve().parent
  beside = next((parent / name for name in (MODEL_GIN, RUN_CONFIG_GIN)
                 if (parent / name).is_file()), None)
  return checkpoint, beside


def configured_model() -> Any:
  """The MODEL of the loaded gin files (OUT/model.gin, a model gin, or a run's
  operative config.gin)."""
  try:
    macro = gin.query_parameter("%MODEL")
  except ValueError:
    raise ValueError("the gin files bind no MODEL") from None
  # Built in the scope gin gives a macro's value (`%MODEL` is evaluated in scope MODEL):
  # an operative config binds `MODEL/encoder_decoder.EncoderDecoderModel.network = ...`.
  with gin.config_scope("MODEL"):
    return macro.scoped_configurable_fn()


def read_params(checkpoint: str | pathlib.Path, network_config: Any) -> dict[str, np.ndarray]:
  """The unscanned parameters of a t5xlike step directory as float32 NumPy arrays,
  checked against the network config's shapes (paths and shapes named on mismatch)."""
  shapes = network_shapes.param_shapes(network_config)
  checkpoints.check_param_shapes(checkpoint, shapes)
  abstract = param_trees.unflatten({name: jax.ShapeDtypeStruct(shape, np.float32)
                                    for name, shape in shapes.items()})
  params, _ = checkpoints.restore_params_from_path(
      checkpoint, abstract, jax.ShapeDtypeStruct((), np.int32))
  flat = {name: np.asarray(value) for name, value in param_trees.flatten(params).items()}
  return param_trees.unstack(flat) if network_config.scan_layers else flat


def sentencepiece_file(vocabulary: Any) -> Vocabulary:
  """The `Vocabulary` of a configured seqio vocabulary (SentencePiece or not)."""
  path = getattr(vocabulary, "sentencepiece_model_file", None)
  return Vocabulary(path, int(getattr(vocabulary, "extra_ids", 0) or 0)) if path else Vocabulary()

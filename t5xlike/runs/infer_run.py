"""The run that `python -m t5xlike.infer` executes (gin root `infer_run.infer`).

Validates the mode, CHECKPOINT_PATH and the input (a JSONL / TSV file, or the
examples of MIXTURE_OR_TASK_NAME) first, nothing written; then predicts or
scores and writes JSONL (`inference.jsonl_io` has the formats).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from etils import epath

from t5xlike import errors
from t5xlike.cli import entry
from t5xlike.inference import checkpoint_loading, decoding, jsonl_io
from t5xlike.inference.predictor import Predictor

log = logging.getLogger(__name__)


def infer(*, model: Any, checkpoint_path: str | None, task_feature_lengths: Mapping[str, int],
          batch_size: int, mode: str = "predict", input_path: str | None = None,
          output_path: str | None = None, max_decode_length: int | None = None,
          decoding_config: decoding.DecodingConfig | None = None,
          mixture_or_task_name: str | None = None, mixture_or_task_module: str | None = None,
          split: str = "validation", infer_output_dir: str | None = None,
          max_examples: int | None = None, use_cached_tasks: bool = False,
          task_cache_dir: str | None = None, mesh_shape: Mapping[str, int] | None = None,
          random_seed: int = 0) -> list[str]:
  """Predicts or scores examples with the parameters of CHECKPOINT_PATH; returns
  the output files written.

  Args:
    model: the model (its VOCABULARY encodes text and decodes predictions).
    checkpoint_path: CHECKPOINT_PATH, a step directory `.../checkpoint_<N>`.
    task_feature_lengths: TASK_FEATURE_LENGTHS: padded input / target lengths;
      'targets' is also the maximum decode length unless `max_decode_length`.
    batch_size: examples per compiled call.
    mode: 'predict' or 'score'.
    input_path, output_path: JSONL files (`--input`, `--output`); without
      `input_path`, the examples of `mixture_or_task_name`'s `split` go to
      `infer_output_dir/<task>-<step>.jsonl` (INFER_OUTPUT_DIR).
    decoding_config: greedy (default), sampling or beam search.
    max_examples: at most this many examples per task (task input only).
    random_seed: RANDOM_SEED, the sampling seed.
  """
  # ---- validation: nothing is written before this block has passed. ----
  if mode not in jsonl_io.MODES:
    raise errors.ConfigError(f"--mode must be one of {jsonl_io.MODES}, got {mode!r}")
  if not checkpoint_path:  # Checked first: reading the input is wasted without it.
    checkpoint_loading.load_checkpoint(model, checkpoint_path, task_feature_lengths, mesh_shape)
  errors.require_int("BATCH_SIZE", batch_size)
  if max_decode_length is not None:
    errors.require_int("--max_decode_length", max_decode_length)
  if input_path and not output_path:
    raise errors.ConfigError("--input needs --output (the JSONL file to write)")
  if not input_path and not (mixture_or_task_name and infer_output_dir):
    raise errors.ConfigError("give --input=F.jsonl --output=G.jsonl, or MIXTURE_OR_TASK_NAME "
                             "and INFER_OUTPUT_DIR for task-based inference")
  vocabulary = getattr(model, "vocabulary", None)
  vocab_size = getattr(model, "vocab_size", None)
  if input_path:
    rows, examples = jsonl_io.read_examples(input_path, mode, vocabulary, vocab_size)
    jobs = [(None, rows, examples)]
  else:
    try:
      from t5xlike.data import task_examples  # pylint: disable=g-import-not-at-top
      jobs = task_examples.read_tasks(mixture_or_task_name, split, task_feature_lengths,
                                      module=mixture_or_task_module,
                                      use_cached=use_cached_tasks, cache_dir=task_cache_dir,
                                      max_examples=max_examples)
    except ValueError as error:
      raise errors.ConfigError(errors.one_line(error)) from None
  model, params, step = checkpoint_loading.load_model_checkpoint(model, checkpoint_path,
                                                       task_feature_lengths, mesh_shape)

  # ---- the run. ----
  entry.mark_run_started()
  eos_id = getattr(vocabulary, "eos_id", 1)
  predictor = Predictor(model, params, task_feature_lengths, batch_size,
                                  decoding_config, max_decode_length, eos_id, seed=random_seed)
  written = []
  for task_name, rows, examples in jobs:
    results = predictor.predict(examples) if mode == "predict" else predictor.score(examples)
    out = jsonl_io.output_rows(mode, rows, results, vocabulary)
    path = (output_path if task_name is None
            else epath.Path(infer_output_dir) / f"{task_name}-{step}.jsonl")
    written.append(str(jsonl_io.write_jsonl(path, out)))
    stats = predictor.last_stats
    if mode == "predict":
      log.info("%s: %d examples, %d tokens generated in %.2f s: %.1f decode tokens/s -> %s",
               task_name or input_path, stats["examples"], stats["generated_tokens"],
               stats["seconds"], stats["decode_tokens_per_second"], path)
    else:
      log.info("%s: %d examples, %d target tokens scored in %.2f s -> %s",
               task_name or input_path, stats["examples"], stats["scored_tokens"],
               stats["seconds"], path)
  return written

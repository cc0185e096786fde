"""The run that `python -m t5xlike.infer` executes (gin root `infer_run.infer`).

`infer(...)` is `execute(plan_inference(...))`: the plan checks the mode,
CHECKPOINT_PATH and the input (a JSONL / TSV file, or the examples of
MIXTURE_OR_TASK_NAME), reads the examples and loads the parameters (nothing
written); `execute` predicts or scores and writes JSONL (`inference.jsonl_io`
has the formats).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from etils import epath

from t5xlike import errors, interfaces
from t5xlike.cli import entry
from t5xlike.inference import checkpoint_loading, decoding, jsonl_io
from t5xlike.inference.predictor import Predictor
from t5xlike.runs.run_config import DataConfig, PartitioningConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class InferPlan:
  """A validated inference run: examples read, the checkpoint loaded.

  Attributes:
    mode: 'predict' or 'score'.
    jobs: (task name, or None for `--input`; input rows; model examples) per output file.
    predictor: the model, its parameters and the decoding settings.
    step: the checkpoint's step (in task output file names).
    output_path: `--output` (with `--input`).
    infer_output_dir: INFER_OUTPUT_DIR (task-based inference).
    source: `--input`, for the log.
  """
  mode: str
  jobs: list[tuple[str | None, list[dict[str, Any]], list[dict[str, Any]]]]
  predictor: Predictor
  step: int
  output_path: str | None
  infer_output_dir: str | None
  source: str | None


def infer(*, model: interfaces.DecodingModel, checkpoint_path: str | None, data: DataConfig,
          mode: str = "predict", input_path: str | None = None, output_path: str | None = None,
          infer_output_dir: str | None = None,
          decoding_config: decoding.DecodingConfig | None = None,
          max_decode_length: int | None = None, max_examples: int | None = None,
          partitioning: PartitioningConfig = PartitioningConfig(),
          random_seed: int = 0, prepack_prefill: bool = False) -> list[str]:
  """Predicts or scores examples with the parameters of CHECKPOINT_PATH; returns
  the output files written.

  Args:
    model: the model (its VOCABULARY encodes text and decodes predictions).
    checkpoint_path: CHECKPOINT_PATH, a step directory `.../checkpoint_<N>`.
    data: TASK_FEATURE_LENGTHS (padded input / target lengths; 'targets' is also
      the maximum decode length unless `max_decode_length`), BATCH_SIZE (examples
      per compiled call) and, for task-based inference, the task or mixture and split.
    mode: 'predict' or 'score'.
    input_path, output_path: JSONL files (`--input`, `--output`); without
      `input_path`, the examples of the task's split go to
      `infer_output_dir/<task>-<step>.jsonl` (INFER_OUTPUT_DIR).
    infer_output_dir: INFER_OUTPUT_DIR.
    decoding_config: greedy (default), sampling or beam search.
    max_decode_length: `--max_decode_length`.
    max_examples: at most this many examples per task (task input only).
    partitioning: the mesh the parameters are laid out on (MESH_SHAPE).
    random_seed: RANDOM_SEED, the sampling seed.
    prepack_prefill: PREPACK_PREFILL: bin-pack each batch's prompts into shared
      rows for the prefill, then decode from the unpacked caches
      (`inference.prepacking`; predict mode, decoder-only and encoder-decoder models).
  """
  return execute(plan_inference(
      model=model, checkpoint_path=checkpoint_path, data=data, mode=mode,
      input_path=input_path, output_path=output_path, infer_output_dir=infer_output_dir,
      decoding_config=decoding_config, max_decode_length=max_decode_length,
      max_examples=max_examples, partitioning=partitioning, random_seed=random_seed,
      prepack_prefill=prepack_prefill))


def plan_inference(*, model: interfaces.DecodingModel, checkpoint_path: str | None,
                   data: DataConfig, mode: str, input_path: str | None,
                   output_path: str | None, infer_output_dir: str | None,
                   decoding_config: decoding.DecodingConfig | None,
                   max_decode_length: int | None, max_examples: int | None,
                   partitioning: PartitioningConfig, random_seed: int,
                   prepack_prefill: bool = False) -> InferPlan:
  """Checks the run (arguments as `infer`'s), reads the examples and loads the parameters;
  nothing written. ConfigError (one line) on a problem."""
  if mode not in jsonl_io.MODES:
    raise errors.ConfigError(f"--mode must be one of {jsonl_io.MODES}, got {mode!r}")
  if not isinstance(prepack_prefill, bool):
    raise errors.ConfigError(f"PREPACK_PREFILL must be True or False, got {prepack_prefill!r}")
  # CHECKPOINT_PATH first: reading the input is wasted without it.
  checkpoint_path = checkpoint_loading.require_checkpoint_path(checkpoint_path)
  errors.require_int("BATCH_SIZE", data.batch_size)
  if max_decode_length is not None:
    errors.require_int("--max_decode_length", max_decode_length)
  if input_path and not output_path:
    raise errors.ConfigError("--input needs --output (the JSONL file to write)")
  if not input_path and not (data.mixture_or_task_name and infer_output_dir):
    raise errors.ConfigError("give --input=F.jsonl --output=G.jsonl, or MIXTURE_OR_TASK_NAME "
                             "and INFER_OUTPUT_DIR for task-based inference")
  partitioner = partitioning.partitioner()
  jobs = _jobs(model, data, mode, input_path, max_examples)
  model, params, step = checkpoint_loading.load_model_checkpoint(
      model, checkpoint_path, data.task_feature_lengths, partitioner)
  eos_id = model.vocabulary.eos_id if model.vocabulary is not None else 1
  predictor = Predictor(model, params, data.task_feature_lengths, data.batch_size,
                        decoding_config, max_decode_length, eos_id, seed=random_seed,
                        prepack_prefill=prepack_prefill, progress="infer")
  return InferPlan(mode=mode, jobs=jobs, predictor=predictor, step=step,
                   output_path=output_path, infer_output_dir=infer_output_dir,
                   source=input_path)


def _jobs(model: interfaces.DecodingModel, data: DataConfig, mode: str,
          input_path: str | None, max_examples: int | None
          ) -> list[tuple[str | None, list[dict[str, Any]], list[dict[str, Any]]]]:
  """(task name or None, rows, examples) of `--input` or of each task of the mixture."""
  jobs: list[tuple[str | None, list[dict[str, Any]], list[dict[str, Any]]]]
  if input_path:
    rows, examples = jsonl_io.read_examples(input_path, mode, model.vocabulary,
                                            model.vocab_size, data.mode_switching)
    jobs = [(None, rows, examples)]
    return jobs
  # seqio and TensorFlow only for task-based inference: `--input` runs without them.
  from t5xlike.data import task_examples  # noqa: PLC0415
  assert data.mixture_or_task_name  # checked by plan_inference
  try:
    jobs = list(task_examples.read_tasks(data.mixture_or_task_name, data.split,
                                    data.task_feature_lengths,
                                    module=data.mixture_or_task_module,
                                    use_cached=data.use_cached_tasks,
                                    cache_dir=data.task_cache_dir, max_examples=max_examples,
                                    mode_switching=data.mode_switching))
  except errors.ConfigError:
    raise
  except ValueError as error:
    raise errors.ConfigError(errors.one_line(error)) from None
  return jobs


def execute(plan: InferPlan) -> list[str]:
  """Predicts or scores each job and writes its JSONL file; returns the files written."""
  entry.mark_run_started()
  predictor, vocabulary = plan.predictor, plan.predictor.model.vocabulary
  written = []
  for task_name, rows, examples in plan.jobs:
    results = (predictor.predict(examples) if plan.mode == "predict"
               else predictor.score(examples))
    out = jsonl_io.output_rows(plan.mode, rows, results, vocabulary)
    path = (plan.output_path if task_name is None
            else epath.Path(plan.infer_output_dir) / f"{task_name}-{plan.step}.jsonl")
    written.append(str(jsonl_io.write_jsonl(path, out)))
    stats = predictor.last_stats
    if plan.mode == "predict":
      log.info("%s: %d examples, %d tokens generated in %.2f s: %.1f decode tokens/s "
               "(%d prefill rows) -> %s", task_name or plan.source, stats["examples"],
               stats["generated_tokens"], stats["seconds"], stats["decode_tokens_per_second"],
               stats["prefill_rows"], path)
    else:
      log.info("%s: %d examples, %d target tokens scored in %.2f s -> %s",
               task_name or plan.source, stats["examples"], stats["scored_tokens"],
               stats["seconds"], path)
  return written

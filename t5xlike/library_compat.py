"""Every use of a private name of another library (gin, seqio, TFDS, JAX), in one place.

Each function says which public API is missing. When a library adds it, only
this module changes; `tests/test_layering.py` checks that no other module of
the package reads a private name of a library. Nothing here imports seqio,
TFDS or TensorFlow: the functions read attributes of objects those libraries
made, so the core may import this module.
"""
from __future__ import annotations

from typing import Any

import gin


# -- gin ----------------------------------------------------------------------------
def gin_defined_macros() -> set[str]:
  """The macros (`NAME = value` without a dot) bound by the gin files parsed so far.

  Missing public API: gin has no query for the bindings of a configurable;
  it keeps macros as bindings of the configurable `gin.macro`, scoped by name,
  in `gin.config._CONFIG`.
  """
  return {scope for (scope, selector) in gin.config._CONFIG  # noqa: SLF001
          if selector == "gin.macro"}


# -- seqio: TFDS sources (`seqio.TfdsDataSource`, `seqio.utils.LazyTfdsLoader`) ------
def tfds_builder(loader: Any, split: str | None = None) -> Any:
  """The TFDS builder a `seqio.utils.LazyTfdsLoader` reads `split` with (seqio memoizes it).

  Missing public API: `LazyTfdsLoader.builder` is the builder of the default
  split only; a split map may name another dataset or data_dir per split, and
  the builder of one split is `loader._get_builder(split)`.
  """
  return loader._get_builder(split)  # noqa: SLF001


def tfds_decoders(loader: Any) -> Any:
  """The TFDS decoders a `seqio.utils.LazyTfdsLoader` reads with (None: none).

  Missing public API: the loader takes `decoders` and has `set_decoders`, but
  no getter; they are `loader._decoders`.
  """
  return loader._decoders  # noqa: SLF001


def tfds_split(loader: Any, split: str) -> str | None:
  """The TFDS split (e.g. 'train[:90%]') that a task split maps to in a `LazyTfdsLoader`.

  Missing public API: `get_split_params(split)` gives the split's dataset
  name and data_dir but not its TFDS split; that mapping is
  `loader._map_split(split)`.
  """
  return loader._map_split(split)  # noqa: SLF001


def tfds_splits_named_by_task(source: Any) -> bool:
  """Whether a `seqio.TfdsDataSource` was given its splits (else they come from TFDS metadata).

  Missing public API: `TfdsDataSource.splits` falls back on the TFDS dataset
  info (which reads the prepared dataset's metadata) when the task named no
  splits; the splits the task named are `source._splits`.
  """
  return bool(source._splits)  # noqa: SLF001


# -- seqio: file sources (`seqio.FileDataSource`, `seqio.TextLineDataSource`) ---------
def text_line_header_lines(source: Any) -> int:
  """The header lines a `seqio.TextLineDataSource` skips at the start of each file.

  Missing public API: the source keeps `skip_header_lines` in its read
  function's closure and in `source._skip_header_lines` only.
  """
  return int(source._skip_header_lines)  # noqa: SLF001


def file_interleave(source: Any) -> tuple[int, int]:
  """(cycle_length, block_length) of the `tf.data` interleave a `seqio.FileDataSource` reads
  its files with.

  Missing public API: the constructor arguments `cycle_length` and
  `block_length` are kept as `source._cycle_length` / `source._block_length`
  only.
  """
  return source._cycle_length, source._block_length  # noqa: SLF001


# -- seqio: vocabularies ------------------------------------------------------------------
def encodes_like(vocabulary_class: type[Any], base_class: type[Any]) -> bool:
  """Whether `vocabulary_class` keeps `base_class`'s TensorFlow encoding (a subclass that
  does not override it, or the class itself).

  Missing public API: seqio's `Vocabulary.encode_tf` calls the private hook
  `_encode_tf` that each vocabulary implements; there is no public way to
  tell whether a subclass changed it.
  """
  return vocabulary_class._encode_tf is base_class._encode_tf  # noqa: SLF001


def byte_vocabulary_offset(vocabulary: Any) -> int:
  """The id of byte 0 in a `seqio.ByteVocabulary` (byte b is id b + offset; seqio: 3).

  Missing public API: the offset (the PAD, EOS and UNK ids before the bytes)
  is `vocabulary._num_special_tokens`, without a public accessor.
  """
  return int(vocabulary._num_special_tokens)  # noqa: SLF001


def pallas_tpu_interpret_mode() -> bool:
  """Whether Pallas TPU interpret mode (`pltpu.force_tpu_interpret_mode()`) is active here.

  Missing public API: JAX has no query for it; the context manager sets the private
  config option `jax._src.config.pallas_tpu_interpret_mode_context_manager`.
  False when this JAX version has no such option.
  """
  try:
    from jax._src import config as jax_config  # noqa: PLC0415  (private: read only when asked)
    return jax_config.pallas_tpu_interpret_mode_context_manager.value is not None
  except (ImportError, AttributeError):
    return False


def jit_cache_size(jitted: Any) -> int:
  """How many executables a `jax.jit` function has compiled (one per argument signature).

  Missing public API: `jax.jit` wrappers expose the count only as `_cache_size()`.
  """
  return int(jitted._cache_size())  # noqa: SLF001


# -- XLA: cost analysis of GPU executables ------------------------------------------
def hlo_cost_analysis_on_cpu(compiled: Any) -> dict[str, float] | None:
  """XLA's HLO cost analysis ('flops', 'bytes accessed', per device) of the optimised
  module of a compiled step, computed by the CPU client; None when it cannot be made.

  Missing public API: `jax.stages.Compiled.cost_analysis()` is unimplemented for the
  CUDA plugin's (compile-only) executables, and XLA's cost analysis of a given HLO
  module is reachable only as `jax._src.lib.xla_client._xla.hlo_module_cost_analysis`.
  The CPU client counts what XLA's HLO cost analysis counts on any backend (dots,
  elementwise work, bytes of every instruction's operands and result); custom calls
  (cuBLAS, cuDNN) count nothing.
  """
  import jax  # noqa: PLC0415  (this module is imported before JAX is configured)
  from jax._src.lib import xla_client  # noqa: PLC0415  (private: only here)
  try:
    module = compiled.runtime_executable().hlo_modules()[0]
    client = jax.devices("cpu")[0].client
    analysis = xla_client._xla.hlo_module_cost_analysis(client, module)  # noqa: SLF001
  except Exception:  # noqa: BLE001  (private API: any failure means no figure)
    return None
  return {key: float(value) for key, value in analysis.items()}

"""seqio's deterministic preprocessors replayed in Python, per example, outside tf.data.

`replay_steps(task)` turns a task's pre-cache preprocessors into Python steps
over raw source examples (a batch at a time): `seqio.preprocessors.rekey`,
`tokenize`, `tokenize_and_append_eos` (SentencePiece and byte vocabularies)
and the text-line parsers `parse_lines` / `parse_tsv` defined here (seqio
preprocessors with a TensorFlow body for seqio, replayed in Python). Anything
else raises `NotDirect` naming the preprocessor. Used by
`t5xlike.data.direct_sources`; the replayed examples equal seqio's.
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from t5xlike import library_compat
from t5xlike.data import seqio_tasks


class NotDirect(ValueError):
  """The task split cannot be read directly; the message says why."""


# -- seqio preprocessors for text lines, replayable ---------------------------
def parse_lines(dataset: tf.data.Dataset, key: str = "text") -> tf.data.Dataset:
  """Lines of a `TextLineDataSource` as examples `{key: line}` (seqio preprocessor).

  Use with `functools.partial(parse_lines, key="targets")` before
  `seqio.preprocessors.tokenize`; t5xlike replays it outside tf.data.
  """
  return dataset.map(lambda line: {key: line}, num_parallel_calls=tf.data.AUTOTUNE)


def parse_tsv(dataset: tf.data.Dataset, field_names: Sequence[str],
              field_delim: str = "\t") -> tf.data.Dataset:
  """Lines of exactly `len(field_names)` fields as `{name: field}` (seqio preprocessor).

  No quoting (`tf.io.decode_csv(use_quote_delim=False)`); a line with
  another number of fields is an error, in TensorFlow and in the replay.
  """
  names, defaults = list(field_names), [""] * len(field_names)

  def parse(line):
    return dict(zip(names, tf.io.decode_csv(line, record_defaults=defaults,
                                            field_delim=field_delim, use_quote_delim=False)))
  return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


# -- preprocessor replay --------------------------------------------------------
Spec = Any  # A tf.TensorSpec, or a dict of specs (nested: dicts); a text line: one spec.


@dataclasses.dataclass(frozen=True)
class _Step:
  name: str
  apply: Callable[[list[Any]], list[Any]]  # Examples -> examples (a batch, in order).
  spec: Callable[[Any], Any]  # Spec -> spec (NotDirect where the replay would differ).


def string_scalar() -> tf.TensorSpec:
  return tf.TensorSpec([], tf.string)


def _is_string(spec: Any) -> bool:
  return isinstance(spec, tf.TensorSpec) and spec.dtype == tf.string


def _as_bytes(value: Any) -> bytes:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _encoder(vocabulary: seqio.Vocabulary) -> Callable[[list[bytes]], list[np.ndarray]] | None:
  """`vocabulary.encode_tf` of a batch of strings, for vocabularies whose TensorFlow
  encoding is known (SentencePiece, bytes); None for others.

  SentencePiece runs the vocabulary's own tf_text tokenizer op (the one
  encode_tf runs in seqio's tf.data map), eagerly, once per batch: the Python
  sentencepiece library breaks ties between equal-score segmentations
  differently ('___' -> '_' '__' or '__' '_'; 5 of the 1,121 embedded-corpus
  documents), so it is not used. Bytes are NumPy.
  """
  kind, sentencepiece = type(vocabulary), seqio.SentencePieceVocabulary
  if (issubclass(kind, sentencepiece) and library_compat.encodes_like(kind, sentencepiece)
      and kind.tf_tokenizer is sentencepiece.tf_tokenizer):
    tokenizer: list[Any] = []  # Made on first use: a TF resource holding the model.
    lock = threading.Lock()

    def encode(texts: list[bytes]) -> list[np.ndarray]:
      if not tokenizer:
        with lock:
          if not tokenizer:
            tokenizer.append(vocabulary.tf_tokenizer)
      ragged = tokenizer[0].tokenize(tf.constant(texts, tf.string))
      values = ragged.flat_values.numpy().astype(np.int32, copy=False)
      splits = ragged.row_splits.numpy()
      return [values[a:b] for a, b in zip(splits[:-1], splits[1:])]
    return encode
  if (issubclass(kind, seqio.ByteVocabulary)
      and library_compat.encodes_like(kind, seqio.ByteVocabulary)):
    offset = library_compat.byte_vocabulary_offset(vocabulary)
    return lambda texts: [np.frombuffer(t, np.uint8).astype(np.int32) + offset for t in texts]
  return None


def _rekey_step(key_map: Mapping[str, str | None] | None) -> _Step:
  """seqio.preprocessors.rekey: {new: x[old]}, '' where old is None or ''."""
  def spec(x):
    if not key_map:
      return x
    if not isinstance(x, dict):
      raise NotDirect("rekey is applied to examples that are not dicts")
    missing = [old for old in key_map.values() if old and old not in x]
    if missing:
      raise NotDirect(f"rekey reads features {missing} that the examples lack")
    return {new: x[old] if old else string_scalar() for new, old in key_map.items()}

  def apply(xs):
    if not key_map:
      return xs
    return [{new: x[old] if old else b"" for new, old in key_map.items()} for x in xs]
  return _Step("rekey", apply, spec)


def _tokenize_step(name: str, output_features: Mapping[str, seqio.Feature],
                   copy_pretokenized: bool, with_eos: bool) -> _Step:
  """seqio.preprocessors.tokenize: every output feature present is encoded (a
  `<k>_pretokenized` copy kept if asked); with_eos appends EOS where add_eos."""
  encoders = {}
  for key, feature in output_features.items():
    encoder = _encoder(feature.vocabulary)
    if encoder is not None:  # The others: `spec` refuses them before any example is read.
      encoders[key] = encoder

  def spec(x):
    if not isinstance(x, dict):
      raise NotDirect(f"{name} is applied to examples that are not dicts")
    out = {}
    for key, value in x.items():
      if key in output_features:
        if key not in encoders:
          raise NotDirect(f"{name}: the vocabulary of {key!r} is a "
                          f"{type(output_features[key].vocabulary).__name__} (direct reads "
                          f"tokenize with SentencePiece and byte vocabularies)")
        if not _is_string(value) or value.shape.rank != 0:
          raise NotDirect(f"{name}: feature {key!r} is not a string scalar ({value})")
        if copy_pretokenized:
          out[f"{key}_pretokenized"] = value
        value = tf.TensorSpec([None], tf.int32)
      out[key] = value
    return out

  eos = {key: np.array([f.vocabulary.eos_id], np.int32) for key, f in output_features.items()
         if with_eos and f.add_eos}

  def apply(xs):
    keys = [k for k in (xs[0] if xs else {}) if k in output_features]
    ids = {k: encoders[k]([_as_bytes(x[k]) for x in xs]) for k in keys}
    outs = []
    for i, x in enumerate(xs):
      out = {}
      for key, value in x.items():
        if key in ids:
          if copy_pretokenized:
            out[f"{key}_pretokenized"] = value
          value = ids[key][i]
          if key in eos:
            value = np.concatenate([value, eos[key]])
        out[key] = value
      outs.append(out)
    return outs
  return _Step(name, apply, spec)


def _parse_lines_step(key: str) -> _Step:
  def spec(x):
    if not _is_string(x) or x.shape.rank != 0:
      raise NotDirect("parse_lines is applied to examples that are not lines of text")
    return {key: x}
  return _Step("parse_lines", lambda lines: [{key: line} for line in lines], spec)


def _parse_tsv_step(field_names: Sequence[str], field_delim: str) -> _Step:
  names, delim = list(field_names), field_delim.encode("utf-8")

  def spec(x):
    if not _is_string(x) or x.shape.rank != 0:
      raise NotDirect("parse_tsv is applied to examples that are not lines of text")
    if len(delim) != 1:
      raise NotDirect(f"parse_tsv: field_delim {field_delim!r} is not one byte")
    return {name: string_scalar() for name in names}

  def parse(line):
    fields = line.split(delim)
    if len(fields) != len(names):
      raise ValueError(f"parse_tsv: expected {len(names)} fields, found {len(fields)} in "
                       f"line {line[:200]!r}")
    return dict(zip(names, fields))
  return _Step("parse_tsv", lambda lines: [parse(line) for line in lines], spec)


def _keywords(name: str, args: tuple, keywords: dict, allowed: Sequence[str]) -> dict:
  extra = sorted(set(keywords) - set(allowed) - {"output_features", "sequence_length"})
  if args or extra:
    raise NotDirect(f"preprocessor {name} is bound to arguments t5xlike does not replay "
                    f"({', '.join(extra) or 'positional arguments'})")
  return keywords


def replay_steps(task: seqio.Task) -> list[_Step]:
  """The task's deterministic preprocessors as Python steps; NotDirect naming the first
  one that cannot be replayed."""
  steps = []
  for preprocessor in seqio_tasks.split_preprocessors(task)[0]:
    function, args, keywords = seqio_tasks.unwrap_partial(preprocessor)
    name = seqio_tasks.preprocessor_name(preprocessor)
    if function is seqio.preprocessors.rekey:
      steps.append(_rekey_step(_keywords(name, args, keywords, ["key_map"]).get("key_map")))
    elif function in (seqio.preprocessors.tokenize, seqio.preprocessors.tokenize_and_append_eos):
      eos_default = function is seqio.preprocessors.tokenize_and_append_eos
      allowed = ["copy_pretokenized"] + ([] if eos_default else ["with_eos"])
      kw = _keywords(name, args, keywords, allowed)
      steps.append(_tokenize_step(name, task.output_features, kw.get("copy_pretokenized", True),
                                  kw.get("with_eos", eos_default)))
    elif function is parse_lines:
      steps.append(_parse_lines_step(_keywords(name, args, keywords, ["key"]).get("key", "text")))
    elif function is parse_tsv:
      kw = _keywords(name, args, keywords, ["field_names", "field_delim"])
      if "field_names" not in kw:
        raise NotDirect("parse_tsv needs field_names")
      steps.append(_parse_tsv_step(kw["field_names"], kw.get("field_delim", "\t")))
    else:
      raise NotDirect(f"preprocessor {name} cannot be replayed outside tf.data (t5xlike "
                      f"replays rekey, tokenize, tokenize_and_append_eos, "
                      f"preprocessor_replay.parse_lines and parse_tsv)")
  return steps

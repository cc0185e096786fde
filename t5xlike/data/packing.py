"""Packing: several examples per row, for every feature converter (NumPy).

The pipeline packs with grain's first-fit packer,

  grain.experimental.FirstFitPackIterDataset(
      ds.map(lambda ex: prepare_for_packing(converter, ex, lengths)),
      length_struct=pack_lengths(converter, lengths), num_packing_bins=N, ...)

which packs a dict of 1-D sequences jointly (an example goes into a row only
when ALL its features fit) and emits, for each feature `k` of the
length_struct, `k` (0-padded), `k_segment_ids` (1, 2, ... per example, the
same id for one example across features, 0 on padding) and `k_positions`
(0, 1, ... within each example). `packed_batch` turns a list of such rows
into the model features with T5X's names, each [b, length]: the layouts of
seqio's packed feature converters (google/seqio,
seqio/feature_converters_test.py, `test_encoder_decoder_packed`,
`test_lm_only_packed`, `test_prefix_lm_packed`).

Per-example sequences (`prepare_for_packing`, truncated to fit as the
unpacked converters in `feature_converters` truncate) and the model
features (`packed_batch`), per converter:

encoder_decoder  packs {inputs: L_in, targets: L_t}. seqio's example,
  inputs [7 8 5 1] + [8 4 9 3 1], targets [3 9 1] + [4 1], L_in 10, L_t 7:
    encoder_input_tokens  7 8 5 1 8 4 9 3 1 0
    encoder_segment_ids   1 1 1 1 2 2 2 2 2 0
    encoder_positions     0 1 2 3 0 1 2 3 4 0
    decoder_target_tokens 3 9 1 4 1 0 0
    decoder_input_tokens  0 3 9 0 4 0 0      (shifted right within each segment)
    decoder_segment_ids   1 1 1 2 2 0 0
    decoder_positions     0 1 2 0 1 0 0
    decoder_loss_weights  1 1 1 1 1 0 0

decoder, causal LM (no `inputs` in the feature lengths) packs {targets: L};
  the same decoder_* features as above.

decoder, prefix LM (`inputs` in the feature lengths) packs, per example, the
  concatenation `inputs + targets` and two per-token side sequences of the
  same length, L = L_in + L_t:
    targets           inputs + targets
    loss_weights      0 on the inputs, 1 on the targets
    causal_attention  1 on the first len(inputs) + 1 positions (the prefix
                      as seen through the shifted decoder input), else 0
  so seqio's PrefixLM layout holds within every segment. seqio's example,
  inputs [7 8 5 1] + [8 4 9 3 1], targets [3 9 1] + [4 1], L_in 8, L_t 7:
    decoder_target_tokens    7 8 5 1 3 9 1 8 4 9 3 1 4 1 0
    decoder_input_tokens     0 7 8 5 1 3 9 0 8 4 9 3 1 4 0
    decoder_segment_ids      1 1 1 1 1 1 1 2 2 2 2 2 2 2 0
    decoder_positions        0 1 2 3 4 5 6 0 1 2 3 4 5 6 0
    decoder_loss_weights     0 0 0 0 1 1 1 0 0 0 0 0 1 1 0
    decoder_causal_attention 1 1 1 1 1 0 0 1 1 1 1 1 1 0 0
  An example without `inputs` in a prefix-LM run is a causal-LM example
  (an empty prefix: loss on every token, causal attention on its first
  position only, which sees nothing else before it anyway).

Masked Thought (`data.masked_thought`): examples that carry
  `feature_converters.DECODER_INPUT_TARGETS` (the targets as the decoder reads
  them) pack it too, as a side sequence of the length of `targets` (a prefix
  LM's: the prefix, then the read targets), and `decoder_input_tokens` is that
  sequence shifted right within each segment (`pack_lengths(...,
  read_targets=True)`).

encoder (MLM, ELECTRA) packs {inputs, targets, mlm_weights: L_in each} into
  encoder_input_tokens, encoder_target_tokens, mlm_weights,
  encoder_segment_ids, encoder_positions.

pairwise_encoder_decoder / pairwise_decoder (preference pairs) pack each
  side's sequences of the base converter under `chosen_` / `rejected_`
  prefixes (`data.pairwise`); the packer places all of an example's
  features together, so both sides of pair k are segment k of the same row.

Tokens, ids and positions are int32; weights float32. Segment ids need not
be consecutive (grain gives an empty example an id of its own); only their
equality is used.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from t5xlike.data import feature_converters, pairwise

Example = Mapping[str, np.ndarray]
Batch = dict[str, np.ndarray]

CONVERTERS = tuple(feature_converters.CONVERTERS)


def _check_converter(converter: str) -> None:
  if converter not in CONVERTERS:
    raise ValueError(f"unknown feature converter {converter!r}; known: {', '.join(CONVERTERS)}")


def _require(feature_lengths: Mapping[str, int], keys: Sequence[str], what: str) -> None:
  missing = [k for k in keys if k not in feature_lengths]
  if missing:
    raise ValueError(f"packing for the {what} feature converter needs TASK_FEATURE_LENGTHS "
                     f"{missing} (got {dict(feature_lengths)})")


def is_prefix_lm(feature_lengths: Mapping[str, int]) -> bool:
  """Whether the `decoder` converter makes prefix-LM rows: `inputs` has a feature length."""
  return "inputs" in feature_lengths


def pack_lengths(converter: str, feature_lengths: Mapping[str, int],
                 read_targets: bool = False) -> dict[str, int]:
  """The `length_struct` to pack with: per-example feature name -> packed row length.

  encoder_decoder: {inputs: L_in, targets: L_t}; decoder (causal):
  {targets: L_t}; decoder (prefix LM): {targets, loss_weights,
  causal_attention: L_in + L_t each}; encoder: {inputs, targets,
  mlm_weights: L_in each}. `read_targets` (Masked Thought; encoder_decoder and
  decoder): also DECODER_INPUT_TARGETS, of the length of `targets`.
  """
  lengths = _pack_lengths(converter, feature_lengths)
  if read_targets:
    if pairwise.is_pairwise(converter) or "targets" not in lengths or converter == "encoder":
      raise ValueError(f"the {converter} feature converter has no teacher-forced decoder "
                       "inputs to pack")
    lengths[READ_TARGETS] = lengths["targets"]
  return lengths


#: The packed side sequence of the targets as the decoder reads them.
READ_TARGETS = feature_converters.DECODER_INPUT_TARGETS


def _pack_lengths(converter: str, feature_lengths: Mapping[str, int]) -> dict[str, int]:
  if converter in feature_converters.UNPACKED_CONVERTERS:
    raise ValueError(f"the {converter} feature converter keeps one sequence per row and does "
                     f"not pack: set DataConfig.pack=False")
  _check_converter(converter)
  if pairwise.is_pairwise(converter):
    side = pack_lengths(pairwise.base_converter(converter), pairwise.side_lengths(feature_lengths))
    return {f"{s}_{k}": v for s in pairwise.SIDES for k, v in side.items()}
  if converter == "encoder_decoder":
    _require(feature_lengths, ("inputs", "targets"), converter)
    return {"inputs": int(feature_lengths["inputs"]), "targets": int(feature_lengths["targets"])}
  if converter == "decoder":
    _require(feature_lengths, ("targets",), converter)
    if not is_prefix_lm(feature_lengths):
      return {"targets": int(feature_lengths["targets"])}
    length = int(feature_lengths["inputs"]) + int(feature_lengths["targets"])
    return {"targets": length, "loss_weights": length, "causal_attention": length}
  _require(feature_lengths, ("inputs",), converter)
  length = int(feature_lengths["inputs"])
  return {"inputs": length, "targets": length, "mlm_weights": length}


def _sequence(example: Example, key: str, length: int, dtype=np.int32) -> np.ndarray:
  """example[key] as a 1-D `dtype` array of at most `length` items."""
  seq = np.asarray(example[key])
  if seq.ndim != 1:
    raise ValueError(f"feature {key!r} must be 1-D to be packed, got shape {seq.shape}")
  return seq[:length].astype(dtype)


def prepare_for_packing(converter: str, example: Example,
                        feature_lengths: Mapping[str, int]) -> dict[str, np.ndarray]:
  """One objective/task example -> the 1-D sequences to pack (keys of `pack_lengths`).

  Args:
    converter: 'encoder_decoder', 'decoder' or 'encoder'.
    example: `inputs` / `targets` / `mlm_weights` as the unpacked converters
      take them (1-D); other keys are ignored.
    feature_lengths: TASK_FEATURE_LENGTHS.
  Returns:
    int32 sequences (float32 `mlm_weights`), each truncated to its feature
    length as the unpacked converters truncate (prefix LM: inputs to L_in and
    targets to L_t, then concatenated).
  """
  lengths = pack_lengths(converter, feature_lengths)
  if pairwise.is_pairwise(converter):
    if any(name in example for name in pairwise.REFERENCE_FEATURES.values()):
      raise ValueError("pairwise examples with precomputed reference log-probabilities are "
                       "per example: set DataConfig.pack=False")
    base, side_lengths = pairwise.base_converter(converter), pairwise.side_lengths(feature_lengths)
    return {f"{side}_{k}": v for side in pairwise.SIDES for k, v in prepare_for_packing(
        base, pairwise.side_example(example, side), side_lengths).items()}
  if converter == "encoder_decoder":
    return {k: _sequence(example, k, lengths[k]) for k in ("inputs", "targets")
            } | _read_targets(example, np.zeros([0], np.int32), lengths["targets"])
  if converter == "encoder":
    return {"inputs": _sequence(example, "inputs", lengths["inputs"]),
            "targets": _sequence(example, "targets", lengths["targets"]),
            "mlm_weights": _sequence(example, "mlm_weights", lengths["mlm_weights"], np.float32)}
  if not is_prefix_lm(feature_lengths):
    if "inputs" in example:
      raise ValueError("an example with `inputs` needs TASK_FEATURE_LENGTHS['inputs'] for the "
                       f"prefix-LM decoder converter (got {dict(feature_lengths)})")
    return ({"targets": _sequence(example, "targets", lengths["targets"])}
            | _read_targets(example, np.zeros([0], np.int32), lengths["targets"]))
  prefix = (_sequence(example, "inputs", int(feature_lengths["inputs"])) if "inputs" in example
            else np.zeros([0], np.int32))
  suffix = _sequence(example, "targets", int(feature_lengths["targets"]))
  index = np.arange(len(prefix) + len(suffix))
  return {"targets": np.concatenate([prefix, suffix]),
          "loss_weights": (index >= len(prefix)).astype(np.int32),
          "causal_attention": (index < len(prefix) + 1).astype(np.int32),
          **_read_targets(example, prefix, int(feature_lengths["targets"]))}


def _read_targets(example: Example, prefix: np.ndarray, length: int) -> dict[str, np.ndarray]:
  """{READ_TARGETS: the prefix, then the read targets (at most `length`)} when the
  example carries them (Masked Thought), else {}."""
  if READ_TARGETS not in example:
    return {}
  return {READ_TARGETS: np.concatenate([prefix, _sequence(example, READ_TARGETS, length)])}


def autoregressive_inputs(targets: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
  """Decoder inputs of packed targets: shifted right within each segment.

  seqio's `autoregressive_inputs(targets, sequence_id=segment_ids)`: position
  p holds targets[p - 1] when p - 1 is in the same segment, else 0 (the BOS
  at every segment's first position; padding stays 0).

  Args:
    targets: int [b, l]; segment_ids: int [b, l] (0 on padding).
  Returns:
    int32 [b, l].
  """
  targets = np.asarray(targets, np.int32)
  segment_ids = np.asarray(segment_ids)
  shifted = np.zeros_like(targets)
  shifted[:, 1:] = targets[:, :-1]
  same = np.zeros(targets.shape, bool)
  same[:, 1:] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
  return np.where(same, shifted, 0).astype(np.int32)


#: Per converter, the packed features whose segment ids and positions are used;
#: the other packed features (per-token side values) only need their values.
_SEGMENTED = {"encoder_decoder": ("inputs", "targets"), "decoder": ("targets",),
              "encoder": ("inputs",)}


def _stack(rows: Sequence[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
           lengths: Mapping[str, int], converter: str) -> dict[str, np.ndarray]:
  """grain rows (a list of [l] dicts, or one dict of [b, l] arrays) -> [b, l] arrays."""
  needed = [name for k in lengths for name in (
      (k, f"{k}_segment_ids", f"{k}_positions") if k in _SEGMENTED[converter] else (k,))]
  if not isinstance(rows, Mapping) and not rows:
    raise ValueError("packed_batch needs at least one row")
  stacked = {}
  for name in needed:
    present = name in rows if isinstance(rows, Mapping) else all(name in row for row in rows)
    if not present:
      raise ValueError(f"packed rows for the {converter} converter lack {name!r} (pack "
                       f"with length_struct=pack_lengths(...): {dict(lengths)})")
    value = (np.asarray(rows[name]) if isinstance(rows, Mapping)
             else np.stack([np.asarray(row[name]) for row in rows]))
    length = lengths[name.removesuffix("_segment_ids").removesuffix("_positions")]
    if value.ndim != 2 or value.shape[1] != length:
      raise ValueError(f"packed feature {name!r} has shape {value.shape}, expected "
                       f"[rows, {length}] (pack with length_struct=pack_lengths(...))")
    stacked[name] = value
  return stacked


def packed_batch(converter: str,
                 rows: Sequence[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
                 feature_lengths: Mapping[str, int]) -> Batch:
  """Packed rows (grain's FirstFitPackIterDataset output) -> T5X model features.

  Args:
    converter: 'encoder_decoder', 'decoder' or 'encoder'.
    rows: b rows as grain emits them, each a dict of [l] arrays with, for
      every key k of `pack_lengths(converter, feature_lengths)`, `k`,
      `k_segment_ids` and `k_positions` (or one dict of [b, l] arrays, the
      rows already batched); with READ_TARGETS (Masked Thought) the decoder reads
      that sequence instead of `targets`.
    feature_lengths: TASK_FEATURE_LENGTHS.
  Returns:
    Each [b, length] (see the module docstring for the layouts):
    encoder_decoder: encoder_input_tokens, encoder_segment_ids,
      encoder_positions [b, L_in]; decoder_target_tokens, decoder_input_tokens,
      decoder_segment_ids, decoder_positions, decoder_loss_weights [b, L_t].
    decoder: decoder_target_tokens, decoder_input_tokens, decoder_segment_ids,
      decoder_positions, decoder_loss_weights (+ decoder_causal_attention for
      a prefix LM) [b, L].
    encoder: encoder_input_tokens, encoder_target_tokens, mlm_weights,
      encoder_segment_ids, encoder_positions [b, L_in].
    int32 tokens, ids and positions; float32 weights.
  """
  if pairwise.is_pairwise(converter):
    base, side_lengths = pairwise.base_converter(converter), pairwise.side_lengths(feature_lengths)
    out: Batch = {}
    for side in pairwise.SIDES:
      side_rows = (pairwise.side_features(rows, side) if isinstance(rows, Mapping)
                   else [pairwise.side_features(row, side) for row in rows])
      out.update(pairwise.prefixed(side, packed_batch(base, side_rows, side_lengths)))
    return out
  first = rows if isinstance(rows, Mapping) else (rows[0] if rows else {})
  lengths = pack_lengths(converter, feature_lengths,
                         read_targets=converter != "encoder" and READ_TARGETS in first)
  f = _stack(rows, lengths, converter)
  i32 = lambda k: f[k].astype(np.int32)
  if converter == "encoder":
    return {"encoder_input_tokens": i32("inputs"), "encoder_target_tokens": i32("targets"),
            "mlm_weights": f["mlm_weights"].astype(np.float32),
            "encoder_segment_ids": i32("inputs_segment_ids"),
            "encoder_positions": i32("inputs_positions")}
  targets, segment_ids = i32("targets"), i32("targets_segment_ids")
  read = i32(READ_TARGETS) if READ_TARGETS in f else targets
  batch = {"decoder_target_tokens": targets,
           "decoder_input_tokens": autoregressive_inputs(read, segment_ids),
           "decoder_segment_ids": segment_ids,
           "decoder_positions": i32("targets_positions")}
  real = targets > 0
  if converter == "decoder" and is_prefix_lm(feature_lengths):
    batch["decoder_loss_weights"] = ((f["loss_weights"] > 0) & real).astype(np.float32)
    batch["decoder_causal_attention"] = (f["causal_attention"] > 0).astype(np.int32)
  else:
    batch["decoder_loss_weights"] = real.astype(np.float32)
  if converter == "encoder_decoder":
    batch = {"encoder_input_tokens": i32("inputs"),
             "encoder_segment_ids": i32("inputs_segment_ids"),
             "encoder_positions": i32("inputs_positions"), **batch}
  return batch


#: (token feature, its segment ids): the positions a batch feeds the model (a pairwise
#: batch: those of both sides).
_TOKEN_SEGMENTS = tuple((f"{prefix}{tokens}", f"{prefix}{segments}")
                        for prefix in ("", *(f"{side}_" for side in pairwise.SIDES))
                        for tokens, segments in (("encoder_input_tokens", "encoder_segment_ids"),
                                                 ("decoder_target_tokens", "decoder_segment_ids")))


def packing_efficiency(batch: Mapping[str, np.ndarray]) -> float:
  """Fraction of the token positions (encoder + decoder) that hold a real token.

  A position is real when its segment id is > 0 (packed batches) or, without
  segment ids (unpacked batches), when its token id is > 0. Counted over
  `encoder_input_tokens` and `decoder_target_tokens` (the positions of
  `feature_converters.tokens_per_batch`).
  """
  real, total = 0, 0
  for tokens_key, segments_key in _TOKEN_SEGMENTS:
    if tokens_key not in batch:
      continue
    source = batch[segments_key] if segments_key in batch else batch[tokens_key]
    source = np.asarray(source)
    real += int(np.count_nonzero(source > 0))
    total += source.size
  if total == 0:
    raise ValueError("packing_efficiency needs encoder_input_tokens or decoder_target_tokens, "
                     f"got {sorted(batch)}")
  return real / total

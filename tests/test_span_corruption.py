"""Span corruption: T5's length arithmetic, exact layout, statistics."""
import numpy as np
import pytest

from t5xlike.objectives import span_corruption as sc

VOCAB, EOS = 1000, 1


@pytest.mark.parametrize("inputs_length, expected", [(512, (568, 114)), (128, (141, 29)),
                                                     (1024, (1137, 229))])
def test_lengths_follow_t5_arithmetic(inputs_length, expected):
  assert sc.span_corruption_lengths(inputs_length) == expected


def _reconstruct(inputs, targets):
  """Undoes span corruption: fills each sentinel of the inputs with its target span."""
  spans, key = {}, None
  for tok in targets[:-1]:
    if tok > VOCAB - 200:
      key = tok
      spans[key] = []
    else:
      spans[key].append(tok)
  out = []
  for tok in inputs[:-1]:
    out.extend(spans[tok] if tok > VOCAB - 200 else [tok])
  return out


def test_layout_on_fixed_seed():
  tokens = np.arange(10, 10 + 141, dtype=np.int32)
  out = sc.SpanCorruption().transform(tokens, np.random.default_rng([7, 3]), vocab_size=VOCAB,
                                      eos_id=EOS)
  inputs, targets = out["inputs"], out["targets"]
  # Exactly the lengths T5's arithmetic promises for 141 raw tokens.
  assert len(inputs) == 128 and len(targets) == 29
  assert inputs[-1] == EOS and targets[-1] == EOS
  sentinels_in = [t for t in inputs if t >= VOCAB - 100]
  sentinels_out = [t for t in targets if t >= VOCAB - 100]
  # 21 noise tokens in 7 spans; sentinels count down from the top of the vocabulary.
  assert sentinels_in == sentinels_out == list(range(VOCAB - 1, VOCAB - 8, -1))
  assert targets[0] == VOCAB - 1  # the targets open with <extra_id_0>
  assert inputs[0] == 10          # the inputs open with non-noise ...
  assert inputs[-2] == VOCAB - 7  # ... and close with the last noise span's sentinel
  assert len(targets) - 1 - 7 == 21
  assert _reconstruct(inputs, targets) == tokens.tolist()
  # Same seed, same example; another seed, another corruption.
  again = sc.SpanCorruption().transform(tokens, np.random.default_rng([7, 3]), vocab_size=VOCAB,
                                        eos_id=EOS)
  other = sc.SpanCorruption().transform(tokens, np.random.default_rng([7, 4]), vocab_size=VOCAB,
                                        eos_id=EOS)
  np.testing.assert_array_equal(again["inputs"], inputs)
  assert not np.array_equal(other["inputs"], inputs)


def test_noise_mask_statistics():
  length, samples = 568, 2000
  noise, spans = 0, 0
  for i in range(samples):
    mask = sc.random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng([0, i]))
    noise += mask.sum()
    spans += np.sum(mask & ~np.concatenate([[False], mask[:-1]]))
    assert not mask[0] and mask[-1]
  density = noise / (samples * length)
  mean_span = noise / spans
  assert density == pytest.approx(0.15, abs=0.002)
  assert mean_span == pytest.approx(3.0, abs=0.05)


def test_span_positions_are_spread():
  # The noise is not concentrated anywhere: each position is noise ~15% of the time.
  length, samples = 100, 3000
  counts = np.zeros(length)
  for i in range(samples):
    counts += sc.random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng([1, i]))
  freq = counts[5:-5] / samples
  assert freq.min() > 0.09 and freq.max() < 0.22


def test_short_sequences():
  out = sc.SpanCorruption().transform(np.array([5, 6], np.int32), np.random.default_rng(0),
                                      vocab_size=VOCAB, eos_id=EOS)
  assert out["inputs"].tolist() == [5, VOCAB - 1, EOS]
  assert out["targets"].tolist() == [VOCAB - 1, 6, EOS]


def test_targets_length_too_short_is_an_error():
  with pytest.raises(ValueError, match="too short"):
    sc.SpanCorruption().raw_length({"inputs": 512, "targets": 100})
  assert sc.SpanCorruption().raw_length({"inputs": 512, "targets": 114}) == 568

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


def _runs(mask):
  return int(np.sum(mask & ~np.concatenate([[False], mask[:-1]])))


# (length, r, μ) -> (noise tokens, spans) of T5's `random_spans_noise_mask`, worked by hand
# from its arithmetic: round(float32(L) * r) and round(noise / μ) with round-half-to-even
# (tf.round). Each row is a length where a floor, a round-half-up or float64 would differ.
T5_COUNTS = [
    ((10, 0.15, 3.0), (2, 1)),    # 1.5 -> 2 (floor 1)
    ((11, 0.5, 8.0), (6, 1)),     # 5.5 -> 6 (floor 5)
    ((24, 0.5, 8.0), (12, 2)),    # spans 12 / 8 = 1.5 -> 2 (floor 1)
    ((50, 0.15, 3.0), (8, 3)),    # 7.5 -> 8 (floor 7); 8 / 3 = 2.67 -> 3 (floor 2)
    ((36, 0.15, 3.0), (5, 2)),    # 5.4 -> 5; 5 / 3 = 1.67 -> 2 (floor 1)
    ((30, 0.15, 3.0), (4, 1)),    # 4.5 -> 4 (half to even; half up: 5)
    ((141, 0.5, 8.0), (70, 9)),   # 70.5 -> 70 (half to even); 70 / 8 = 8.75 -> 9 (floor 8)
    ((190, 0.15, 3.0), (29, 10)),  # float32 28.500002 -> 29 (float64 28.4999... -> 28)
    ((130, 0.15, 64.0), (20, 1)),  # 19.5 -> 20; one span at least (20 / 64 -> 0)
]


@pytest.mark.parametrize("args, expected", T5_COUNTS, ids=[str(a) for a, _ in T5_COUNTS])
def test_noise_and_span_counts_round_as_t5(args, expected):
  length, density, mu = args
  assert sc.noise_counts(length, density, mu) == expected
  for seed in range(3):
    mask = sc.random_spans_noise_mask(length, density, mu, np.random.default_rng(seed))
    assert (int(mask.sum()), _runs(mask)) == expected


@pytest.mark.parametrize("density, mu", [(0.15, 3.0), (0.5, 8.0), (0.15, 64.0)])
def test_lengths_are_those_the_transform_makes(density, mu):
  """The length arithmetic counts as the mask does at every length (T5's helper rounds in
  float64 and would mispredict e.g. 190 tokens at r = 0.15)."""
  inputs_length = 96
  raw, targets = sc.span_corruption_lengths(inputs_length, density, mu)
  objective = sc.SpanCorruption(density, mu)
  for length in range(2, raw + 1):
    out = objective.transform(np.arange(3, 3 + length, dtype=np.int32),
                              np.random.default_rng(length), vocab_size=VOCAB, eos_id=EOS)
    noise, spans = sc.noise_counts(length, density, mu)
    assert len(out["inputs"]) == length - noise + spans + 1
    assert len(out["targets"]) == noise + spans + 1
  out = objective.transform(np.arange(3, 3 + raw, dtype=np.int32), np.random.default_rng(0),
                            vocab_size=VOCAB, eos_id=EOS)
  assert len(out["inputs"]) <= inputs_length and len(out["targets"]) == targets
  out = objective.transform(np.arange(3, 4 + raw, dtype=np.int32), np.random.default_rng(0),
                            vocab_size=VOCAB, eos_id=EOS)
  assert len(out["inputs"]) > inputs_length  # the largest raw length that fits

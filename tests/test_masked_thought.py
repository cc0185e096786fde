"""Masked Thought (t5xlike/data/masked_thought.py): which decoder inputs are masked, labels
untouched, rate statistics, determinism and resume, the gin switch's errors."""
import numpy as np
import pytest

from t5xlike import errors, train
from t5xlike.data import feature_converters, masked_thought, packing, pipeline

READ = feature_converters.DECODER_INPUT_TARGETS
M = 99  # the mask id of the hand-written layouts
TASK = "mt_reverse_words"  # tasks/multitask: inputs -> several target tokens + EOS
ENC_DEC = {"inputs": 32, "targets": 12}


@pytest.fixture(scope="module", autouse=True)
def _tasks():
  from t5xlike.tasks import multitask  # noqa: F401  (registers TASK)


# -- layouts of the converters and the packer ----------------------------------------------------
def test_encoder_decoder_layout():
  ex = {"inputs": np.array([9, 4, 1]), "targets": np.array([3, 9, 4, 1]),
        READ: np.array([3, M, 4, 1])}
  got = feature_converters.encoder_decoder_batch([ex], {"inputs": 4, "targets": 6})
  plain = feature_converters.encoder_decoder_batch([{"inputs": ex["inputs"],
                                                     "targets": ex["targets"]}],
                                                   {"inputs": 4, "targets": 6})
  np.testing.assert_array_equal(got["decoder_input_tokens"], [[0, 3, M, 4, 1, 0]])
  for key in ("encoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"):
    np.testing.assert_array_equal(got[key], plain[key])
  np.testing.assert_array_equal(got["decoder_target_tokens"], [[3, 9, 4, 1, 0, 0]])


def test_prefix_lm_layout_masks_the_target_part_only():
  # feature_converters.decoder_batch's docstring example, target token 0 (3) masked.
  ex = {"inputs": np.array([9, 4, 6, 1]), "targets": np.array([3, 9, 1]),
        READ: np.array([M, 9, 1])}
  got = feature_converters.decoder_batch([ex], {"inputs": 4, "targets": 5})
  np.testing.assert_array_equal(got["decoder_target_tokens"], [[9, 4, 6, 1, 3, 9, 1, 0, 0]])
  np.testing.assert_array_equal(got["decoder_input_tokens"], [[0, 9, 4, 6, 1, M, 9, 1, 0]])
  np.testing.assert_array_equal(got["decoder_loss_weights"], [[0, 0, 0, 0, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(got["decoder_causal_attention"], [[1, 1, 1, 1, 1, 0, 0, 0, 0]])
  causal = feature_converters.decoder_batch(
      [{"targets": np.array([5, 6, 7, 1]), READ: np.array([5, M, M, 1])}], {"targets": 6})
  np.testing.assert_array_equal(causal["decoder_input_tokens"], [[0, 5, M, M, 1, 0]])
  np.testing.assert_array_equal(causal["decoder_target_tokens"], [[5, 6, 7, 1, 0, 0]])


def _packed(converter, examples, lengths):
  """Rows of one packed row built by hand: the examples one after another (what grain's
  first-fit packer emits when they fit), segment ids 1, 2, ..."""
  struct = packing.pack_lengths(converter, lengths, read_targets=True)
  prepared = [packing.prepare_for_packing(converter, ex, lengths) for ex in examples]
  row = {}
  for key, length in struct.items():
    values, segments, positions = (np.zeros(length, np.int32) for _ in range(3))
    start = 0
    for s, seq in enumerate(prepared, start=1):
      n = len(seq[key])
      values[start:start + n], segments[start:start + n] = seq[key], s
      positions[start:start + n] = np.arange(n)
      start += n
    row.update({key: values, f"{key}_segment_ids": segments, f"{key}_positions": positions})
  return packing.packed_batch(converter, [row], lengths)


def test_packed_prefix_lm_layout_keeps_segment_boundaries():
  # packing.py's seqio example; the second example's target token 0 (4) masked, and token 1
  # of the first (9).
  examples = [{"inputs": np.array([7, 8, 5, 1]), "targets": np.array([3, 9, 1]),
               READ: np.array([3, M, 1])},
              {"inputs": np.array([8, 4, 9, 3, 1]), "targets": np.array([4, 1]),
               READ: np.array([M, 1])}]
  got = _packed("decoder", examples, {"inputs": 8, "targets": 7})
  np.testing.assert_array_equal(got["decoder_target_tokens"][0],
                                [7, 8, 5, 1, 3, 9, 1, 8, 4, 9, 3, 1, 4, 1, 0])
  np.testing.assert_array_equal(got["decoder_input_tokens"][0],
                                [0, 7, 8, 5, 1, 3, M, 0, 8, 4, 9, 3, 1, M, 0])
  np.testing.assert_array_equal(got["decoder_loss_weights"][0],
                                [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0])


def test_packed_encoder_decoder_layout():
  examples = [{"inputs": np.array([7, 8, 5, 1]), "targets": np.array([3, 9, 1]),
               READ: np.array([M, 9, 1])},
              {"inputs": np.array([8, 4, 9, 3, 1]), "targets": np.array([4, 1]),
               READ: np.array([4, 1])}]
  got = _packed("encoder_decoder", examples, {"inputs": 10, "targets": 7})
  np.testing.assert_array_equal(got["decoder_target_tokens"][0], [3, 9, 1, 4, 1, 0, 0])
  np.testing.assert_array_equal(got["decoder_input_tokens"][0], [0, M, 9, 0, 4, 0, 0])
  np.testing.assert_array_equal(got["decoder_segment_ids"][0], [1, 1, 1, 2, 2, 0, 0])


def test_mask_targets_draws_one_number_per_candidate_and_keeps_the_last_token():
  targets = np.array([5, 6, 7, 8, 9, 1])
  got = masked_thought.mask_targets(targets, np.random.default_rng(3), rate=0.5, mask_id=M,
                                    target_length=5)
  u = np.random.default_rng(3).random(4)  # 5 tokens kept, the last one not a candidate
  np.testing.assert_array_equal(got, np.where(np.r_[u < 0.5, False], M, targets[:5]))
  assert len(got) == 5 and got[-1] == 9


# -- the pipeline --------------------------------------------------------------------------------
def _feed(rate=0.4, converter="encoder_decoder", lengths=ENC_DEC, **kwargs):
  kwargs.setdefault("shuffle", False)
  return pipeline.Pipeline(TASK, "validation", lengths, 8, None, num_threads=0,
                           feature_converter=converter, seed=5,
                           masked_thought=masked_thought.MaskedThought(rate), **kwargs)


def _take(feed, n):
  return [next(feed) for _ in range(n)]


@pytest.mark.parametrize("converter, lengths", [
    ("encoder_decoder", ENC_DEC), ("decoder", {"inputs": 32, "targets": 12})])
def test_pipeline_masks_exactly_the_drawn_target_inputs(converter, lengths):
  """Against a reference built from the spec: example i (unshuffled: batch k row r is
  position 8k + r) draws u ~ rng([seed, 0, epoch, i, STREAM]).random(n - 1) for its n target
  tokens; target token j < n - 1 with u_j < rate is read as vocab_size - 1 at the decoder
  position after it. Everything else equals the unmasked batch."""
  masked, plain = _feed(converter=converter, lengths=lengths), _feed(0.0, converter, lengths)
  mask_id = masked.vocab_size - 1
  count = len(masked.task_examples[0])
  for k, (got, want) in enumerate(zip(_take(masked, 3), _take(plain, 3))):
    assert got.keys() == want.keys()
    for key in got:
      if key != "decoder_input_tokens":
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for r in range(8):
      position = 8 * k + r
      weights = want["decoder_loss_weights"][r]
      first = int(np.argmax(weights > 0))  # where the targets start in the row
      n = int(weights.sum())  # target tokens kept
      u = masked_thought.example_rng(5, 0, position // count, position % count).random(n - 1)
      expected = want["decoder_input_tokens"][r].copy()
      expected[first + 1 + np.flatnonzero(u < 0.4)] = mask_id
      np.testing.assert_array_equal(got["decoder_input_tokens"][r], expected)
      assert got["decoder_input_tokens"][r][0] == 0  # BOS


def test_rate_statistics_within_binomial_tolerance():
  feed = _feed(0.3, pack=True)
  masked = candidates = 0
  mask_id = feed.vocab_size - 1
  for batch in _take(feed, 20):
    seg, weights = batch["decoder_segment_ids"], batch["decoder_loss_weights"]
    # A decoder input holds a target token (a candidate) where it and its predecessor
    # are scored positions of one segment.
    cand = np.zeros(seg.shape, bool)
    cand[:, 1:] = (weights[:, 1:] > 0) & (weights[:, :-1] > 0) & (seg[:, 1:] == seg[:, :-1])
    is_mask = batch["decoder_input_tokens"] == mask_id
    assert not (is_mask & ~cand).any()  # BOS, padding, boundaries, prompts: never
    masked += int(is_mask.sum())
    candidates += int(cand.sum())
  assert candidates > 500
  sigma = np.sqrt(candidates * 0.3 * 0.7)
  assert abs(masked - 0.3 * candidates) <= 4 * sigma, (masked, candidates)


@pytest.mark.parametrize("pack", [False, True])
def test_deterministic_across_runs_and_resume(pack):
  a = _take(_feed(shuffle=True, pack=pack), 4)
  b = _take(_feed(shuffle=True, pack=pack), 4)
  for x, y in zip(a, b):
    assert all(np.array_equal(x[key], y[key]) for key in x)
  feed = _feed(shuffle=True, pack=pack)
  _take(feed, 2)
  state = feed.get_state()
  resumed = _feed(shuffle=True, pack=pack)
  resumed.set_state(state)
  for x, y in zip(a[2:], _take(resumed, 2)):
    assert all(np.array_equal(x[key], y[key]) for key in x)
  assert (a[0]["decoder_input_tokens"] == feed.vocab_size - 1).any()


def test_rate_zero_is_the_plain_pipeline():
  plain = pipeline.Pipeline(TASK, "validation", ENC_DEC, 8, None, num_threads=0, seed=5,
                            shuffle=False)
  for x, y in zip(_take(_feed(0.0), 2), _take(plain, 2)):
    assert all(np.array_equal(x[key], y[key]) for key in x)


# -- configuration errors ------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, True, "0.2", None])
def test_rate_outside_0_1_is_a_config_error(rate):
  with pytest.raises(errors.ConfigError, match="MASKED_THOUGHT_RATE must be a number in"):
    masked_thought.MaskedThought(rate)


def test_encoder_only_model_is_refused():
  with pytest.raises(errors.ConfigError, match="'encoder' has none"):
    masked_thought.MaskedThought(0.2).check_converter("encoder")
  masked_thought.MaskedThought(0.0).check_converter("encoder")  # off: nothing to refuse


@pytest.mark.parametrize("rate", ["1.0", "-0.5"])
def test_gin_switch_out_of_range_fails_in_one_line_and_writes_nothing(tmp_path, capsys, rate):
  model_dir = tmp_path / "run"
  code = train.main(["--gin_file=gin_configs/models/t5_1_1/tiny.gin",
                     "--gin_file=gin_configs/finetune/masked_thought.gin",
                     f"--gin.MODEL_DIR='{model_dir}'", f"--gin.MASKED_THOUGHT_RATE={rate}",
                     "--gin.INITIAL_CHECKPOINT_PATH='/no/such/checkpoint_1'"])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: ") and "MASKED_THOUGHT_RATE" in err[-1], err[-1]
  assert not model_dir.exists() and not list(tmp_path.iterdir())


def test_in_order_feed_masks_as_the_pipeline_does():
  """A large uncached task read in order (`feeding.SequentialFeed`): example i draws from
  rng([seed, 0, 0, i, STREAM]), as the pipeline's task 0 in epoch 0 at index i."""
  from t5xlike.data import feeding
  make = lambda rate: pipeline.make_feed(
      TASK, "validation", ENC_DEC, 8, None, seed=5, in_memory_max_examples=10,
      masked_thought=masked_thought.MaskedThought(rate))
  masked, plain = make(0.4), make(0.0)
  assert isinstance(masked, feeding.SequentialFeed)
  got, want = next(masked), next(plain)
  masked.close()
  plain.close()
  for key in ("encoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"):
    np.testing.assert_array_equal(got[key], want[key])
  for r in range(8):
    n = int(want["decoder_loss_weights"][r].sum())
    u = masked_thought.example_rng(5, 0, 0, r).random(n - 1)
    expected = want["decoder_input_tokens"][r].copy()
    expected[1 + np.flatnonzero(u < 0.4)] = masked.vocab_size - 1
    np.testing.assert_array_equal(got["decoder_input_tokens"][r], expected)

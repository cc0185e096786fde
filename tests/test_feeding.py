"""The in-order reader (large uncached tasks): layout, determinism, resume by position, shards."""
import numpy as np
import pytest

import t5xlike.tasks.embedded  # noqa: F401  (registers embedded_corpus: the file runs alone too)
from t5xlike.data import feature_converters, feeding, seqio_tasks
from t5xlike.objectives import span_corruption, ul2

LENGTHS = {"inputs": 64, "targets": 16}


def make_feed(seed=0, batch_size=4, **kwargs):
  return feeding.SequentialFeed("embedded_corpus", "train", LENGTHS, batch_size,
                          span_corruption.SpanCorruption(), seed=seed, **kwargs)


def test_encoder_decoder_features_layout():
  batch = feature_converters.encoder_decoder_batch(
      [{"inputs": np.array([5, 6, 7, 1]), "targets": np.array([8, 9, 1])},
       {"inputs": np.array([4, 1]), "targets": np.array([3, 3, 3, 3, 3, 1])}],
      {"inputs": 5, "targets": 4})
  np.testing.assert_array_equal(batch["encoder_input_tokens"], [[5, 6, 7, 1, 0], [4, 1, 0, 0, 0]])
  np.testing.assert_array_equal(batch["decoder_target_tokens"], [[8, 9, 1, 0], [3, 3, 3, 3]])
  np.testing.assert_array_equal(batch["decoder_input_tokens"], [[0, 8, 9, 1], [0, 3, 3, 3]])
  np.testing.assert_array_equal(batch["decoder_loss_weights"], [[1, 1, 1, 0], [1, 1, 1, 1]])
  assert batch["decoder_loss_weights"].dtype == np.float32


def test_chunks_are_the_concatenated_token_stream():
  feed = make_feed()
  raw = feed._raw_examples()
  chunks = [next(raw)["targets"] for _ in range(30)]
  raw.close()
  docs = feed.task.get_dataset(sequence_length=None, split="train", shuffle=False,
                               num_epochs=1).as_numpy_iterator()
  stream = np.concatenate([next(docs)["targets"] for _ in range(30)])
  assert feed.chunk_lengths == (70,) and all(len(c) == 70 for c in chunks)
  np.testing.assert_array_equal(np.concatenate(chunks), stream[:30 * 70])


def test_ul2_chunks_are_cut_at_each_denoisers_length():
  """In-order reading cuts the stream as the shuffled pipeline does: chunk i at the length
  of the denoiser of slot i mod 7, which then denoises it."""
  objective = ul2.UL2()
  lengths = {"inputs": 64, "targets": 64}
  with feeding.SequentialFeed("embedded_corpus", "train", lengths, 4, objective) as feed:
    cycle = objective.chunk_lengths(lengths)
    examples = feed.examples()
    pairs = [next(examples) for _ in range(21)]
    examples.close()
    docs = feed.task.get_dataset(sequence_length=None, split="train", shuffle=False,
                                 num_epochs=1).as_numpy_iterator()
    stream = np.concatenate([next(docs)["targets"] for _ in range(30)])
  assert len(set(cycle)) > 1 and feed.chunk_lengths == cycle
  assert [len(raw["targets"]) for raw, _ in pairs] == list(cycle) * 3
  assert [int(f["denoiser"]) for _, f in pairs] == list(objective.cycle) * 3
  np.testing.assert_array_equal(np.concatenate([raw["targets"] for raw, _ in pairs]),
                                stream[:3 * sum(cycle)])


def test_same_seed_same_batches_and_resume_by_position():
  with make_feed() as a, make_feed() as b, make_feed(seed=1) as other:
    first = [next(a) for _ in range(3)]
    again = [next(b) for _ in range(3)]
    for x, y in zip(first, again):
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(next(other)["encoder_input_tokens"],
                              first[0]["encoder_input_tokens"])
    state = a.get_state()
    assert state == {"examples": 12}
    following = next(a)
  with make_feed() as resumed:
    resumed.set_state(state)
    restored = next(resumed)
  for key in following:
    np.testing.assert_array_equal(following[key], restored[key])


def test_processes_read_disjoint_rows_of_the_global_batch():
  with make_feed() as whole, make_feed(process_index=0, process_count=2) as p0, \
      make_feed(process_index=1, process_count=2) as p1:
    for _ in range(2):
      full, a, b = next(whole), next(p0), next(p1)
      for key in full:
        np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), full[key])


def test_bad_requests_are_clear_errors():
  with pytest.raises(ValueError, match="no split 'test'"):
    feeding.SequentialFeed("embedded_corpus", "test", LENGTHS, 4, span_corruption.SpanCorruption())
  with pytest.raises(ValueError, match="divisible"):
    make_feed(batch_size=3, process_count=2)
  with pytest.raises(ValueError, match="unknown task or mixture 'nope'"):
    seqio_tasks.get_task("nope")


def test_eval_feed_ends_after_one_epoch():
  feed = feeding.SequentialFeed("embedded_corpus", "validation", LENGTHS, 64,
                          span_corruption.SpanCorruption(), num_epochs=1)
  batches = list(feed)
  # ~19.2k validation tokens in chunks of 70: 274 examples, 4 full batches of 64.
  assert len(batches) == 4

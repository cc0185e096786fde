"""The grain pipeline: determinism, epochs, resume, process shards, mixtures, packing."""
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5xlike.data import chunking, mixing, packing, pipeline, sources
from t5xlike.objectives import span_corruption
from t5xlike.tasks import embedded

LENGTHS = {"inputs": 32, "targets": 8}


def make(batch_size=4, seed=0, **kwargs):
  kwargs.setdefault("num_threads", 0)
  return pipeline.Pipeline("embedded_corpus", "validation", LENGTHS, batch_size,
                           span_corruption.SpanCorruption(), seed=seed, **kwargs)


def take(feed, n):
  return [feed.__next__() for _ in range(n)]


def same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_bytes_other_seed_other_order():
  a, b, c = take(make(), 5), take(make(), 5), take(make(seed=1), 5)
  assert all(x.keys() == y.keys() and all(x[k].tobytes() == y[k].tobytes() for k in x)
             for x, y in zip(a, b))
  assert not same(a[0], c[0])


def test_epochs_are_full_passes_in_fresh_orders():
  feed = make(shuffle=True)
  chunks = len(feed.task_examples[0])
  mixed = feed._mixed(with_raw=True)
  first = [tuple(mixed[i][0]["targets"][:4]) for i in range(chunks)]
  second = [tuple(mixed[chunks + i][0]["targets"][:4]) for i in range(chunks)]
  assert sorted(first) == sorted(second) and first != second
  unshuffled = make(shuffle=False)._mixed(with_raw=True)
  assert sorted(first) == sorted(tuple(unshuffled[i][0]["targets"][:4]) for i in range(chunks))


def test_resume_from_state_gives_the_same_batches():
  feed = make()
  take(feed, 3)
  state = feed.get_state()
  expected = take(feed, 4)
  resumed = make()
  resumed.set_state(state)
  assert all(same(x, y) for x, y in zip(expected, take(resumed, 4)))


def test_state_resumes_under_another_process_count_unless_packed():
  feed = make(batch_size=4)
  take(feed, 2)
  state = feed.get_state()
  expected = take(feed, 2)
  halves = []
  for p in range(2):
    part = make(batch_size=4, process_index=p, process_count=2)
    part.set_state(state)
    halves.append(take(part, 2))
  rows = lambda b: {r.tobytes() for r in b["encoder_input_tokens"]}
  for k in range(2):
    assert rows(halves[0][k]) | rows(halves[1][k]) == rows(expected[k])
  packed = make(pack=True)
  take(packed, 1)
  with pytest.raises(ValueError, match="packed data state was saved by 1 process"):
    make(pack=True, process_index=0, process_count=2).set_state(packed.get_state())


def test_processes_read_disjoint_slices_of_the_global_batch():
  whole = take(make(batch_size=4), 3)
  parts = [take(make(batch_size=4, process_index=p, process_count=2), 3) for p in range(2)]
  for k in range(3):
    rows = lambda b: {row.tobytes() for row in b["encoder_input_tokens"]}
    a, b = rows(parts[0][k]), rows(parts[1][k])
    assert not a & b and a | b == rows(whole[k])


def _register_letter_tasks():
  if "letters_a" in seqio.TaskRegistry.names():
    return
  vocab = embedded.vocabulary()
  for letter, count in (("a", 60), ("b", 20), ("c", 400)):
    def dataset_fn(split, shuffle_files, seed=None, letter=letter, count=count):
      del split, shuffle_files, seed
      texts = [f"{letter} {i}" for i in range(count)]
      return tf.data.Dataset.from_tensor_slices({"inputs": texts, "targets": texts})
    seqio.TaskRegistry.add(
        f"letters_{letter}", source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
        preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                       seqio.preprocessors.append_eos_after_trim],
        output_features={k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")})
  seqio.MixtureRegistry.add("letters_fixed", [("letters_a", 3.0), ("letters_b", 1.0)])
  seqio.MixtureRegistry.add("letters_capped", ["letters_a", "letters_b", "letters_c"],
                            default_rate=mixing.num_examples(maximum=100, temperature=2.0))


@pytest.mark.parametrize("mixture,expected", [
    ("letters_fixed", {"a": 0.75, "b": 0.25}),
    # min(count, 100) ** (1 / 2): a 60, b 20, c 400 -> 100.
    ("letters_capped", {"a": 60 ** 0.5, "b": 20 ** 0.5, "c": 10.0})])
def test_mixture_frequencies_follow_rates(mixture, expected):
  _register_letter_tasks()
  feed = pipeline.Pipeline(mixture, "train", {"inputs": 8, "targets": 8}, 8, None,
                           num_threads=0)
  vocab = embedded.vocabulary()
  counts = {}
  for batch in take(feed, 50):
    for row in batch["encoder_input_tokens"]:
      letter = vocab.decode([int(t) for t in row if t > 1]).split()[0]
      counts[letter] = counts.get(letter, 0) + 1
  n = sum(counts.values())
  total = sum(expected.values())
  for letter, rate in expected.items():
    p = rate / total
    assert abs(counts.get(letter, 0) - n * p) <= 4 * np.sqrt(n * p * (1 - p)) + 1, counts


def test_packing_efficiency_of_paragraphs_above_90_percent():
  # One paragraph of the embedded corpus per example (49 tokens on average), 128 per row.
  args = ("embedded_paragraphs", "validation", {"targets": 128}, 16, None)
  packed = pipeline.Pipeline(*args, feature_converter="decoder", pack=True, num_threads=0)
  measured = np.mean([packing.packing_efficiency(b) for b in take(packed, 10)])
  assert measured > 0.9, measured
  assert packed.metrics()["packing_efficiency"] > 0.9
  unpacked = pipeline.Pipeline(*args, feature_converter="decoder", num_threads=0)
  assert np.mean([packing.packing_efficiency(b) for b in take(unpacked, 10)]) < 0.5


@pytest.mark.parametrize("lengths, expected", [
    (4, [4, 4, 4, 4, 2]),
    ((4, 2, 5), [4, 2, 5, 4, 2, 1]),  # a cycle: slots 0, 1, 2, 0, 1, 2 (the remainder)
    ((4, 2, 5, 9), [4, 2, 5, 7]),     # the stream ends inside the first cycle's last slot
])
def test_chunks_cut_the_stream_in_a_cycle_of_lengths(lengths, expected):
  docs = [np.arange(start, stop, dtype=np.int32) for start, stop in
          ((0, 5), (5, 8), (8, 17), (17, 18))]  # 18 tokens in 4 documents
  source = sources.InMemorySource([{"targets": d} for d in docs])
  chunks = chunking.ChunkedSource(source, "targets", lengths)
  assert len(chunks) == len(expected)
  got = [chunks[i]["targets"] for i in range(len(chunks))]
  assert [len(c) for c in got] == expected
  np.testing.assert_array_equal(np.concatenate(got), np.arange(18))  # each token once
  cycle = 1 if isinstance(lengths, int) else len(lengths)
  assert [chunks.slot(i) for i in range(len(chunks))] == [i % cycle for i in range(len(chunks))]
  with pytest.raises(IndexError):
    chunks[len(chunks)]


def test_threads_do_not_change_the_order():
  a = take(make(num_threads=0), 4)
  b = take(make(num_threads=3), 4)
  assert all(same(x, y) for x, y in zip(a, b))


def test_large_uncached_task_is_read_in_order():
  from t5xlike.data import feeding
  feed = pipeline.make_feed("embedded_corpus", "validation", LENGTHS, 4,
                            span_corruption.SpanCorruption(), in_memory_max_examples=10,
                            num_threads=0)
  assert isinstance(feed, feeding.SequentialFeed)
  first = take(feed, 2)
  state = feed.get_state()
  again = pipeline.make_feed("embedded_corpus", "validation", LENGTHS, 4,
                             span_corruption.SpanCorruption(), in_memory_max_examples=10)
  take(again, 2)
  assert same(take(feed, 1)[0], take(again, 1)[0]) and state == {"examples": 8}
  feed.close()
  again.close()
  assert first[0]["encoder_input_tokens"].shape == (4, 32)

"""UL2 mode switching (t5xlike/objectives/mode_switching.py): the paradigm token reaches the
inputs exactly once, in training (feeds, task evaluation) and inference (JSONL, tasks); the
ids are UL2's; unknown or unrepresentable tokens are one-line errors that write nothing."""
import json
import re

import numpy as np
import pytest

from t5xlike import errors, infer, train
from t5xlike.data import pipeline, task_examples
from t5xlike.inference import jsonl_io
from t5xlike.objectives import mode_switching, span_corruption, ul2
from t5xlike.tasks import embedded

TASK = "mt_reverse_words"
LENGTHS = {"inputs": 40, "targets": 12}
VOCAB = embedded.vocabulary()
S2S_TEXT = [832, 505, 221, 505, 418]  # '[S2S]' in the embedded vocabulary's pieces


@pytest.fixture(scope="module", autouse=True)
def _tasks():
  from t5xlike.tasks import multitask  # noqa: F401  (registers TASK)


def test_prepend_once_layouts():
  token = np.array([7, 8])
  np.testing.assert_array_equal(mode_switching.prepend_once(np.array([1, 2]), token),
                                [7, 8, 1, 2])
  np.testing.assert_array_equal(mode_switching.prepend_once(np.array([7, 8, 1, 2]), token),
                                [7, 8, 1, 2])  # already there: not twice
  np.testing.assert_array_equal(mode_switching.prepend_once(np.array([7, 1, 2]), token),
                                [7, 8, 7, 1, 2])  # a partial match is not the token
  np.testing.assert_array_equal(mode_switching.prepend_once(np.array([8]), token), [7, 8, 8])


@pytest.mark.parametrize("paradigm_tokens", ["text", "special"])
def test_ids_are_those_ul2_pretraining_prepends(paradigm_tokens):
  """One source of truth: each mode's ids are what the UL2 objective put first in the inputs
  of that paradigm's denoisers."""
  objective = ul2.UL2(paradigm_tokens=paradigm_tokens)
  objective.setup(VOCAB)
  objective.chunk_lengths({"inputs": 128, "targets": 128})
  switching = mode_switching.ModeSwitching(paradigm_tokens=paradigm_tokens)
  tokens = np.arange(2, 302, dtype=np.int32)
  for slot, k in enumerate(objective.cycle):
    inputs = objective.transform_chunk(tokens, slot, np.random.default_rng(0),
                                       vocab_size=VOCAB.vocab_size, eos_id=1)["inputs"]
    ids = switching.token_ids(objective.denoisers[k].paradigm, VOCAB)
    np.testing.assert_array_equal(inputs[:len(ids)], ids)
  expected = (S2S_TEXT if paradigm_tokens == "text" else [VOCAB.vocab_size + 2])
  np.testing.assert_array_equal(switching.token_ids(ul2.S2S, VOCAB), expected)


def test_mode_of_task_and_default():
  switching = mode_switching.ModeSwitching(default="[NLG]", per_task={"a": "[S2S]", "b": None})
  assert [switching.mode_of(t) for t in ("a", "b", "c", None)] == ["[S2S]", None, "[NLG]",
                                                                   "[NLG]"]
  assert switching.active and not mode_switching.ModeSwitching().active


# -- training: the feeds --------------------------------------------------------------------------
def _batches(converter, lengths, switching, n=2):
  feed = pipeline.Pipeline(TASK, "validation", lengths, 8, None, num_threads=0, shuffle=False,
                           feature_converter=converter, mode_switching=switching)
  return [next(feed) for _ in range(n)]


@pytest.mark.parametrize("converter, key", [("encoder_decoder", "encoder_input_tokens"),
                                            ("decoder", "decoder_target_tokens")])
def test_training_inputs_get_the_token_once(converter, key):
  """Against the plain batch: the token's ids, then the same inputs (prefix of a prefix-LM
  row); targets unchanged. The per-task token wins over MODE_TOKEN."""
  switching = mode_switching.ModeSwitching(default="[NLU]", per_task={TASK: "[S2S]"})
  plain = _batches(converter, LENGTHS, None)
  for got, want in zip(_batches(converter, LENGTHS, switching), plain):
    for r in range(8):
      width = int(np.count_nonzero(want[key][r])) if converter == "encoder_decoder" else int(
          np.argmax(want["decoder_loss_weights"][r] > 0))
      expected = np.r_[S2S_TEXT, want[key][r][:width]]
      np.testing.assert_array_equal(got[key][r][:len(expected)], expected)
      if converter == "encoder_decoder":
        assert not got[key][r][len(expected):].any()
        np.testing.assert_array_equal(got["decoder_target_tokens"][r],
                                      want["decoder_target_tokens"][r])
      else:
        np.testing.assert_array_equal(got[key][r][len(expected):len(expected) + 12],
                                      want[key][r][width:width + 12])


def test_task_evaluation_and_task_inference_read_the_same_inputs():
  switching = mode_switching.ModeSwitching(default="[S2S]")
  (name, _, examples), = task_examples.read_tasks(TASK, "validation", LENGTHS, max_examples=3,
                                                  mode_switching=switching)
  plain = task_examples.read_split(task_examples.leaf_tasks(TASK)[0], "validation", LENGTHS,
                                   use_cached=False, cache_dir=None, max_examples=3)
  assert name == TASK
  for ex, ref in zip(examples, plain):
    np.testing.assert_array_equal(ex["inputs"], np.r_[S2S_TEXT, ref["inputs"]])
  twice = [switching.apply(ex, TASK, VOCAB) for ex in examples]  # already there: unchanged
  assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(twice, examples))


def test_token_with_a_pretraining_objective_is_refused():
  with pytest.raises(errors.ConfigError, match="for supervised tasks"):
    pipeline.Pipeline("embedded_corpus", "validation", {"inputs": 32, "targets": 8}, 4,
                      span_corruption.SpanCorruption(), num_threads=0,
                      mode_switching=mode_switching.ModeSwitching(default="[S2S]"))


# -- inference: JSONL requests --------------------------------------------------------------------
def test_jsonl_mode_field_default_and_exactly_once(tmp_path):
  text = "Count the words: a b"
  lines = [{"inputs": text, "mode": "[S2S]"},
           {"inputs": f"[S2S] {text}", "mode": "[S2S]"},  # already there
           {"inputs": text},  # MODE_TOKEN
           {"inputs": text, "mode": None},  # asks for none
           {"input_ids": [5, 6, 1], "mode": "[NLU]"}]
  path = tmp_path / "in.jsonl"
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  rows, examples = jsonl_io.read_examples(str(path), "predict", VOCAB, 8192,
                                          mode_switching.ModeSwitching(default="[S2S]"))
  plain = list(VOCAB.encode(text)) + [VOCAB.eos_id]
  nlu = list(VOCAB.encode("[NLU]"))
  expected = [S2S_TEXT + plain, S2S_TEXT + plain, S2S_TEXT + plain, plain, nlu + [5, 6, 1]]
  assert [ex["inputs"].tolist() for ex in examples] == expected
  assert rows == lines  # the output repeats the request, its mode included
  special = mode_switching.ModeSwitching(paradigm_tokens="special")
  _, examples = jsonl_io.read_examples(str(path), "predict", VOCAB, 8192, special)
  assert examples[0]["inputs"].tolist() == [8102] + plain
  assert examples[2]["inputs"].tolist() == plain  # no default


class _NoBrackets:
  """A vocabulary without '[' (it encodes to the unknown piece)."""
  vocab_size, eos_id, unk_id = 100, 1, 2

  def encode(self, text):
    return [2 if c == "[" else 3 for c in text]

  def decode(self, ids):
    return "".join(" ⁇ " if i == 2 else "x" for i in ids)


@pytest.mark.parametrize("line, vocabulary, vocab_size, message", [
    ({"inputs": "a", "mode": "[XYZ]"}, VOCAB, 8192, "'[XYZ]' is not a UL2 mode token"),
    ({"inputs": "a", "mode": 3}, VOCAB, 8192, "is not a UL2 mode token"),
    ({"inputs": "a", "mode": "[S2S]"}, _NoBrackets(), 100, "the vocabulary lacks the mode"),
])
def test_jsonl_bad_mode_is_a_line_error(tmp_path, line, vocabulary, vocab_size, message):
  path = tmp_path / "in.jsonl"
  path.write_text(json.dumps({"inputs": "fine"}) + "\n" + json.dumps(line) + "\n")
  with pytest.raises(errors.ConfigError, match=f"in.jsonl:2: .*{re.escape(message)}"):
    jsonl_io.read_examples(str(path), "predict", vocabulary, vocab_size)


def test_special_id_beyond_the_embedding_is_refused():
  switching = mode_switching.ModeSwitching(paradigm_tokens="special")
  with pytest.raises(errors.ConfigError, match="id 8102 but the model has 8101 embeddings"):
    switching.token_ids("[S2S]", VOCAB, model_vocab_size=8101)


# -- the commands: one line, exit code 2, nothing written -----------------------------------------
def test_infer_request_with_an_unknown_mode_writes_nothing(tmp_path, capsys):
  checkpoint = tmp_path / "run" / "checkpoint_1"
  (checkpoint / "state").mkdir(parents=True)  # (the input is read before the parameters)
  source, out = tmp_path / "in.jsonl", tmp_path / "out" / "never.jsonl"
  source.write_text(json.dumps({"inputs": "a b", "mode": "[NLX]"}) + "\n")
  code = infer.main(["--gin_file=gin_configs/models/t5_1_1/tiny.gin",
                     "--gin_file=gin_configs/runs/infer.gin",
                     f"--gin.CHECKPOINT_PATH={checkpoint}", "--mode=predict",
                     f"--input={source}", f"--output={out}"])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: ") and "in.jsonl:1" in err[-1] and "[NLX]" in err[-1]
  assert not out.parent.exists()


@pytest.mark.parametrize("command, override", [
    ("train", "--gin.MODE_TOKEN='[XYZ]'"),
    ("train", "--gin.TASK_MODE_TOKENS={'mt_count_words': 'S2S'}"),
    ("infer", "--gin.MODE_TOKEN='[XYZ]'"),
])
def test_gin_mode_token_the_vocabulary_lacks_is_one_line(tmp_path, capsys, command, override):
  model_dir = tmp_path / "run"
  args = ["--gin_file=gin_configs/models/t5_1_1/tiny.gin", override]
  if command == "train":
    code = train.main(args + ["--gin_file=gin_configs/runs/finetune.gin",
                              f"--gin.MODEL_DIR='{model_dir}'",
                              "--gin.INITIAL_CHECKPOINT_PATH='/no/such/checkpoint_1'"])
  else:
    code = infer.main(args + ["--gin_file=gin_configs/runs/infer.gin",
                              "--gin.CHECKPOINT_PATH='/no/such/checkpoint_1'",
                              f"--input={tmp_path / 'in.jsonl'}",
                              f"--output={model_dir / 'out.jsonl'}"])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: ") and "is not a UL2 mode token" in err[-1], err[-1]
  assert not list(tmp_path.iterdir())


def test_in_order_feed_prepends_the_token_too():
  from t5xlike.data import feeding
  make = lambda switching: pipeline.make_feed(TASK, "validation", LENGTHS, 8, None,
                                              in_memory_max_examples=10,
                                              mode_switching=switching)
  feed, plain = make(mode_switching.ModeSwitching(default="[S2S]")), make(None)
  assert isinstance(feed, feeding.SequentialFeed)
  got, want = next(feed), next(plain)
  feed.close()
  plain.close()
  for r in range(8):
    width = int(np.count_nonzero(want["encoder_input_tokens"][r]))
    np.testing.assert_array_equal(got["encoder_input_tokens"][r][:width + 5],
                                  np.r_[S2S_TEXT, want["encoder_input_tokens"][r][:width]])

"""`python -m t5xlike.convert`: Hugging Face T5 / Llama and T5X checkpoints in and out.

References: random small `transformers` models (PyTorch, CPU, float32) built
and saved here (no hub); T5X checkpoints written here in T5X's layouts
(`tests/t5x_checkpoints.py`; the T5X import's own tests: tests/test_convert_t5x.py).
"""
import json
import logging
import pathlib

import numpy as np
import pytest

from t5xlike import convert, infer
from t5xlike.data import feature_converters
from t5xlike.interop import hf_weights, output_dir, param_trees

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests import hf_reference, t5x_checkpoints  # noqa: E402  (torch, transformers: skipped above)

TOL = 1e-4


def _convert(*flags) -> int:
  return convert.main([str(f) for f in flags])


def _t5_batch(seed: int = 1):
  rng = np.random.default_rng(seed)
  encoder = rng.integers(2, hf_reference.VOCAB, (2, 12))
  encoder[1, 9:] = 0  # Padding in row 1.
  targets = rng.integers(2, hf_reference.VOCAB, (2, 7))
  return {"encoder_input_tokens": encoder.astype(np.int32),
          "decoder_target_tokens": targets.astype(np.int32),
          "decoder_input_tokens": feature_converters.shift_right(targets).astype(np.int32),
          "decoder_loss_weights": np.ones((2, 7), np.float32)}


def _llama_batch(seed: int = 2):
  targets = np.random.default_rng(seed).integers(2, hf_reference.VOCAB, (2, 11))
  return {"decoder_target_tokens": targets.astype(np.int32),
          "decoder_input_tokens": feature_converters.shift_right(targets).astype(np.int32),
          "decoder_loss_weights": np.ones((2, 11), np.float32)}


def _our_logits(out_dir: pathlib.Path, batch) -> tuple[np.ndarray, object, dict]:
  """Logits of a converted t5xlike directory, built from its model.gin."""
  import gin

  from t5xlike.cli import gin_config
  gin_config.configure([str(out_dir / "model.gin")])
  model = output_dir.configured_model()
  gin.clear_config()
  flat = output_dir.read_params(out_dir / "checkpoint", model.network.config)
  params = param_trees.unflatten(flat)
  if model.network.config.scan_layers:
    params = param_trees.unflatten(param_trees.stack(flat))
  return np.asarray(model.logits(params, batch)), model, flat


class _Imported:
  def __init__(self, hf_model, hf_dir, out_dir, batch, logits, model, flat):
    self.hf_model, self.hf_dir, self.out_dir, self.batch = hf_model, hf_dir, out_dir, batch
    self.logits, self.model, self.flat = logits, model, flat


def _import(tmp_path_factory, name, hf_model, batch) -> _Imported:
  root = tmp_path_factory.mktemp(name)
  hf_dir = hf_reference.save(hf_model, root / "hf")
  assert _convert("--from=hf", f"--checkpoint={hf_dir}", f"--output={root / 'ours'}") == 0
  logits, model, flat = _our_logits(root / "ours", batch)
  return _Imported(hf_model, hf_dir, root / "ours", batch, logits, model, flat)


@pytest.fixture(scope="module")
def t5_v11(tmp_path_factory):
  return _import(tmp_path_factory, "t5_v11", hf_reference.t5_model(v1_1=True), _t5_batch())


@pytest.fixture(scope="module")
def t5_v10(tmp_path_factory):
  return _import(tmp_path_factory, "t5_v10", hf_reference.t5_model(v1_1=False), _t5_batch())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  return _import(tmp_path_factory, "llama", hf_reference.llama_model(), _llama_batch())


@pytest.fixture(scope="module")
def mt5(tmp_path_factory):
  return _import(tmp_path_factory, "mt5", hf_reference.mt5_model(), _t5_batch())


@pytest.fixture(scope="module")
def llama_tied(tmp_path_factory):
  return _import(tmp_path_factory, "llama_tied", hf_reference.llama_model(seed=4, tied=True),
                 _llama_batch())


def _hf_t5_logits(model, batch):
  return hf_reference.t5_logits(model, batch["encoder_input_tokens"],
                                batch["decoder_input_tokens"])


def test_hf_t5_v1_1_import_matches_transformers(t5_v11):
  cfg = t5_v11.model.network.config
  assert cfg.mlp_activations == ("gelu", "linear") and not cfg.logits_via_embedding
  assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (8, 16)
  np.testing.assert_allclose(t5_v11.logits, _hf_t5_logits(t5_v11.hf_model, t5_v11.batch),
                             atol=TOL, rtol=0)
  # The untied head is lm_head, not the embedding.
  np.testing.assert_array_equal(t5_v11.flat["decoder/logits_dense/kernel"],
                                t5_v11.hf_model.lm_head.weight.detach().numpy().T)


def test_hf_t5_v1_0_import_matches_transformers(t5_v10):
  cfg = t5_v10.model.network.config
  assert cfg.mlp_activations == ("relu",) and cfg.logits_via_embedding
  np.testing.assert_allclose(t5_v10.logits, _hf_t5_logits(t5_v10.hf_model, t5_v10.batch),
                             atol=TOL, rtol=0)


def test_hf_llama_import_matches_transformers(llama):
  cfg = llama.model.network.config
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.rope_max_wavelength, cfg.norm_epsilon) == (
      4, 2, 500.0, 1e-5)
  np.testing.assert_allclose(
      llama.logits, hf_reference.llama_logits(llama.hf_model, llama.batch["decoder_input_tokens"]),
      atol=TOL, rtol=0)


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def load_hf(cls, directory, capfd):
  """(model, loading info, warnings that `transformers` logged or printed)."""
  logger = logging.getLogger("transformers")  # Does not propagate to the root logger.
  records = _Records()
  logger.addHandler(records)
  try:
    capfd.readouterr()
    loaded, info = cls.from_pretrained(directory, output_loading_info=True)
  finally:
    logger.removeHandler(records)
  printed = capfd.readouterr()
  lines = [line.strip() for text in (printed.out, printed.err)
           for line in text.replace("\r", "\n").splitlines()]
  lines = [line for line in lines if line and not line.startswith("Loading weights")]
  return loaded.eval(), info, records.messages + lines


def test_hf_mt5_import_matches_transformers(mt5):
  assert not mt5.model.network.config.logits_via_embedding
  np.testing.assert_allclose(mt5.logits, _hf_t5_logits(mt5.hf_model, mt5.batch), atol=TOL, rtol=0)


def test_hf_tied_llama_import_matches_transformers(llama_tied):
  assert llama_tied.model.network.config.tie_embeddings
  assert "decoder/logits_dense/kernel" not in llama_tied.flat
  np.testing.assert_allclose(llama_tied.logits, hf_reference.llama_logits(
      llama_tied.hf_model, llama_tied.batch["decoder_input_tokens"]), atol=TOL, rtol=0)


def _export(imported, tmp_path, capfd):
  """--to=hf of an imported model; (loaded HF model, loading info, warnings)."""
  out = tmp_path / "exported"
  assert _convert("--from=t5xlike", "--to=hf", f"--checkpoint={imported.out_dir / 'checkpoint'}",
                  f"--output={out}") == 0
  return load_hf(type(imported.hf_model), out, capfd)


def _weights_warnings(warnings):
  return [w for w in warnings if "missing" in w.lower() or "unexpected" in w.lower()
          or "newly initialized" in w.lower()]


def test_load_hf_sees_missing_weight_warnings(t5_v10, tmp_path, capfd):
  """The warnings check below can fail: a directory lacking a tensor is reported."""
  from safetensors.numpy import load_file, save_file
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text((t5_v10.hf_dir / "config.json").read_text())
  tensors = load_file(str(t5_v10.hf_dir / "model.safetensors"))
  del tensors["encoder.final_layer_norm.weight"]
  save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
  _, info, warnings = load_hf(type(t5_v10.hf_model), broken, capfd)
  assert info["missing_keys"] and _weights_warnings(warnings)


@pytest.mark.parametrize("name", ["t5_v11", "t5_v10"])
def test_export_t5_to_transformers(name, request, tmp_path, capfd):
  imported = request.getfixturevalue(name)
  loaded, info, warnings = _export(imported, tmp_path, capfd)
  assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
  assert not _weights_warnings(warnings), warnings
  # transformers >= 5 always ties T5's lm_head; an untied head is loaded with a warning.
  assert all("will NOT tie them" in w for w in warnings) and (
      bool(warnings) == (name == "t5_v11")), warnings
  np.testing.assert_allclose(_hf_t5_logits(loaded, imported.batch), imported.logits,
                             atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["llama", "llama_tied"])
def test_export_llama_to_transformers(name, request, tmp_path, capfd):
  imported = request.getfixturevalue(name)
  loaded, info, warnings = _export(imported, tmp_path, capfd)
  assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
  assert not warnings, warnings  # Not even a tying warning.
  np.testing.assert_allclose(
      hf_reference.llama_logits(loaded, imported.batch["decoder_input_tokens"]),
      imported.logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["t5_v11", "llama"])
def test_round_trip_ours_hf_ours_is_exact(name, request, tmp_path):
  round_trip(request.getfixturevalue(name), tmp_path)


def round_trip(imported, tmp_path, *export_flags):
  """ours -> HF (with `export_flags`) -> ours: the parameters bit-identical, the same model.gin."""
  assert _convert("--from=t5xlike", "--to=hf", f"--checkpoint={imported.out_dir / 'checkpoint'}",
                  f"--output={tmp_path / 'hf'}", *export_flags) == 0
  assert _convert("--from=hf", f"--checkpoint={tmp_path / 'hf'}",
                  f"--output={tmp_path / 'back'}") == 0
  back = output_dir.read_params(tmp_path / "back" / "checkpoint", imported.model.network.config)
  assert sorted(back) == sorted(imported.flat)
  for key, value in imported.flat.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  assert (tmp_path / "back" / "model.gin").read_text() == (
      imported.out_dir / "model.gin").read_text()


def test_exported_safetensors_has_the_usual_file_mode(t5_v10, tmp_path, capfd):
  """model.safetensors gets the mode of any new file (0644 under umask 022), not the
  0600 of safetensors' temporary file; under umask 027, 0640."""
  import os
  import stat
  out = tmp_path / "exported"
  assert _convert("--from=t5xlike", "--to=hf", f"--checkpoint={t5_v10.out_dir}",
                  f"--output={out}") == 0
  mode = stat.S_IMODE((out / hf_weights.SAFETENSORS).stat().st_mode)
  assert mode == stat.S_IMODE((out / "config.json").stat().st_mode)
  assert mode == 0o666 & ~_umask()
  previous = os.umask(0o027)
  try:
    written = hf_weights.write_safetensors(tmp_path, {"a": np.zeros(3, np.float32)})
  finally:
    os.umask(previous)
  assert stat.S_IMODE(written.stat().st_mode) == 0o640


def _umask() -> int:
  import os
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def test_convert_output_directory_is_accepted_as_checkpoint(t5_v10, tmp_path):
  """--checkpoint=OUT (OUT/model.gin + OUT/checkpoint/): the export holds the tensors of
  the original Hugging Face model, exactly."""
  from safetensors.numpy import load_file
  assert _convert("--from=t5xlike", "--to=hf", f"--checkpoint={t5_v10.out_dir}",
                  f"--output={tmp_path / 'hf'}") == 0
  exported = load_file(str(tmp_path / "hf" / hf_weights.SAFETENSORS))
  original = load_file(str(t5_v10.hf_dir / hf_weights.SAFETENSORS))
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


# ---- A training run's checkpoint: the model from MODEL_DIR/config.gin. ----

@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
  """A one-step run of the quickstart config (tiny lengths): MODEL_DIR/checkpoint_1 and
  the run's operative MODEL_DIR/config.gin, no model.gin."""
  from t5xlike import train
  model_dir = tmp_path_factory.mktemp("quickstart") / "run"
  assert train.main(["--gin_file=gin_configs/quickstart.gin", f"--gin.MODEL_DIR={model_dir}",
                     "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=2", "--gin.EVAL_PERIOD=None",
                     "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]) == 0
  assert (model_dir / "config.gin").is_file() and not (model_dir / "model.gin").exists()
  return model_dir


def _run_logits(checkpoint: pathlib.Path, batch) -> np.ndarray:
  """Logits of a quickstart checkpoint with the model of models/t5_1_1/tiny.gin."""
  import gin

  from t5xlike.cli import gin_config
  gin_config.configure(["models/t5_1_1/tiny.gin"])
  model = output_dir.configured_model()
  gin.clear_config()
  params = param_trees.unflatten(output_dir.read_params(checkpoint, model.network.config))
  return np.asarray(model.logits(params, batch))


@pytest.mark.slow  # ~38 s (a quickstart-sized run first)
def test_training_run_checkpoint_exports_with_the_model_of_its_config_gin(quickstart_run,
                                                                         tmp_path, capfd):
  """convert --from=t5xlike --checkpoint=MODEL_DIR/checkpoint_1 (no --gin_file): the
  model comes from the run's config.gin; transformers gives the logits t5xlike gives."""
  out = tmp_path / "hf"
  assert _convert("--from=t5xlike", "--to=hf", f"--checkpoint={quickstart_run / 'checkpoint_1'}",
                  f"--output={out}") == 0
  loaded, info, _ = load_hf(transformers.T5ForConditionalGeneration, out, capfd)
  assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
  assert (out / "spiece.model").is_file()  # The run's VOCABULARY (the embedded corpus').
  batch = _t5_batch()
  np.testing.assert_allclose(_hf_t5_logits(loaded, batch),
                             _run_logits(quickstart_run / "checkpoint_1", batch),
                             atol=TOL, rtol=0)


def test_config_gin_with_modules_not_importable_here_still_gives_the_model(quickstart_run,
                                                                           tmp_path, caplog):
  """A run whose config.gin imports code this process cannot import (a user's objective
  module): the import and what references it are skipped; MODEL needs neither."""
  import shutil

  from safetensors.numpy import load_file
  run = tmp_path / "run"
  shutil.copytree(quickstart_run, run)
  text = (run / "config.gin").read_text()
  assert "train_run.train.objective = @span_corruption.SpanCorruption()" in text
  embedded_import = "from t5xlike.tasks import embedded\n"
  text = text.replace(embedded_import,
                      embedded_import + "from my_private_objectives import spans\n")
  assert "from my_private_objectives import spans" in text
  text = text.replace("train_run.train.objective = @span_corruption.SpanCorruption()",
                      "train_run.train.objective = @spans.Custom()")
  (run / "config.gin").write_text(text + "\nspans.Custom.rate = 0.5\n")
  assert _convert("--from=t5xlike", "--to=hf", f"--checkpoint={run / 'checkpoint_1'}",
                  f"--output={tmp_path / 'a'}") == 0
  # (logged on stdout by a command: tests/test_console_log.py)
  assert any("not importable here, skipped with their bindings: my_private_objectives"
             in record.getMessage() for record in caplog.records)
  assert _convert("--from=t5xlike", "--to=hf", f"--checkpoint={quickstart_run / 'checkpoint_1'}",
                  f"--output={tmp_path / 'b'}") == 0
  a, b = (load_file(str(tmp_path / d / hf_weights.SAFETENSORS)) for d in "ab")
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ---- End to end: convert, then `python -m t5xlike.infer --mode=score`. ----

def _score_with_infer(out_dir: pathlib.Path, rows: list, tmp_path: pathlib.Path,
                      lengths: str) -> list[float]:
  source, scored = tmp_path / f"{out_dir.name}_in.jsonl", tmp_path / f"{out_dir.name}_out.jsonl"
  source.write_text("".join(json.dumps(r) + "\n" for r in rows))
  code = infer.main([f"--gin_file={out_dir / 'model.gin'}", "--gin_file=runs/infer.gin",
                     f"--gin.CHECKPOINT_PATH={out_dir / 'checkpoint'}",
                     f"--gin.TASK_FEATURE_LENGTHS={lengths}", "--gin.BATCH_SIZE=2",
                     "--mode=score", f"--input={source}", f"--output={scored}"])
  assert code == 0
  return [json.loads(line)["score"] for line in scored.read_text().splitlines()]


def _log_likelihood(logits: np.ndarray, targets: list[int]) -> float:
  logits = logits[:len(targets)].astype(np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                              keepdims=True)) - logits.max(-1, keepdims=True)
  return float(sum(log_probs[i, t] for i, t in enumerate(targets)))


_T5_ROWS = [{"input_ids": [5, 17, 99, 3, 42, 8, 1], "target_ids": [7, 64, 12, 1]},
            {"input_ids": [11, 2, 120, 1], "target_ids": [33, 9, 81, 100, 27, 1]}]


def _hf_t5_scores(model, rows) -> list[float]:
  scores = []
  for row in rows:
    targets = row["target_ids"]
    logits = hf_reference.t5_logits(model, np.asarray([row["input_ids"]]),
                                    np.asarray([[0] + targets[:-1]]))[0]
    scores.append(_log_likelihood(logits, targets))
  return scores


def test_cli_hf_and_t5x_to_infer_score_equals_transformers(t5_v11, llama, tmp_path):
  lengths = "{'inputs': 10, 'targets': 8}"
  expected = _hf_t5_scores(t5_v11.hf_model, _T5_ROWS)
  np.testing.assert_allclose(_score_with_infer(t5_v11.out_dir, _T5_ROWS, tmp_path, lengths),
                             expected, atol=1e-4, rtol=0)
  # The same weights as a scanned T5X checkpoint.
  t5x_checkpoints.write_t5x_msgpack(tmp_path / "checkpoint_100", t5_v11.flat, scanned=True)
  assert _convert("--from=t5x", f"--checkpoint={tmp_path / 'checkpoint_100'}",
                  f"--output={tmp_path / 'from_t5x'}",
                  "--relative_attention_max_distance=16") == 0
  np.testing.assert_allclose(
      _score_with_infer(tmp_path / "from_t5x", _T5_ROWS, tmp_path, lengths), expected,
      atol=1e-4, rtol=0)
  # Llama: a causal LM scores its targets after the BOS (id 0, t5xlike's convention).
  rows = [{"input_ids": [], "target_ids": [5, 17, 99, 3, 42, 1]},
          {"input_ids": [], "target_ids": [11, 2, 120]}]
  expected = [_log_likelihood(hf_reference.llama_logits(
      llama.hf_model, np.asarray([[0] + r["target_ids"][:-1]]))[0], r["target_ids"])
              for r in rows]
  np.testing.assert_allclose(_score_with_infer(llama.out_dir, rows, tmp_path, lengths),
                             expected, atol=1e-4, rtol=0)


# ---- Bad input: one line, exit 2, nothing written. ----

@pytest.mark.parametrize("flags, message", [
    (["--from=hf", "--checkpoint={tmp}/nowhere"], "--checkpoint="),
    (["--from=hf", "--checkpoint={tmp}"], "no config.json"),
    (["--from=t5x", "--checkpoint={tmp}"], "not a T5X checkpoint"),
    (["--from=t5xlike", "--to=t5xlike", "--checkpoint={tmp}"], "both t5xlike"),
    (["--from=t5xlike", "--to=hf", "--checkpoint={tmp}"], "needs the model gin"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(flags, message, tmp_path, capsys):
  source = tmp_path / "source"
  source.mkdir()
  flags = [f.replace("{tmp}", str(source)) for f in flags]
  assert _convert(*flags, f"--output={tmp_path / 'out'}") == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "out").exists()


def test_cli_bad_checkpoint_prints_one_line_on_stderr_and_logs_to_stdout(tmp_path):
  """From the shell: the progress log goes to stdout, stderr holds the error alone."""
  import subprocess
  import sys
  (tmp_path / "checkpoint_3").mkdir()
  result = subprocess.run(
      [sys.executable, "-m", "t5xlike.convert", "--from=t5x",
       f"--checkpoint={tmp_path / 'checkpoint_3'}", f"--output={tmp_path / 'out'}"],
      capture_output=True, text=True, timeout=300,
      cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      f"error: {tmp_path / 'checkpoint_3'} is not a T5X checkpoint step directory: expected "
      "T5X's orbax step directory (a 'state/' PyTree item holding 'target'), an orbax PyTree "
      "checkpoint, or a 'checkpoint' msgpack file"], result.stderr
  assert "reading t5x checkpoint" in result.stdout
  assert not (tmp_path / "out").exists()


def test_checkpoint_that_is_a_file_is_refused(tmp_path, capsys):
  (tmp_path / "checkpoint_3").write_text("")
  assert _convert("--from=t5x", f"--checkpoint={tmp_path / 'checkpoint_3'}",
                  f"--output={tmp_path / 'out'}") == 2
  err = capsys.readouterr().err.strip()
  assert err == f"error: --checkpoint={tmp_path / 'checkpoint_3'}: not a directory"
  assert not (tmp_path / "out").exists()


def test_unsupported_hf_config_is_refused(tmp_path, capsys):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  assert _convert("--from=hf", f"--checkpoint={tmp_path}", f"--output={tmp_path}/o") == 2
  assert "model_type='gpt2' is not supported" in capsys.readouterr().err


def test_weight_reader_reads_sharded_safetensors(t5_v10, tmp_path):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(t5_v10.hf_dir / "model.safetensors"))
  names = sorted(tensors)
  halves = {"a.safetensors": names[:10], "b.safetensors": names[10:]}
  for file, part in halves.items():
    save_file({n: tensors[n] for n in part}, str(tmp_path / file))
  (tmp_path / hf_weights.SAFETENSORS_INDEX).write_text(json.dumps(
      {"weight_map": {n: f for f, part in halves.items() for n in part}}))
  reader = hf_weights.WeightReader(tmp_path)
  assert reader.names() == names
  np.testing.assert_array_equal(reader.get(names[15]), tensors[names[15]])


def test_pytorch_bin_weights_import_like_safetensors(t5_v10, tmp_path):
  """HF's PyTorch `pytorch_model.bin` (read only where torch is installed)."""
  from safetensors.torch import load_file
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text((t5_v10.hf_dir / "config.json").read_text())
  torch.save(load_file(str(t5_v10.hf_dir / "model.safetensors")),
             tmp_path / "hf" / "pytorch_model.bin")
  assert _convert("--from=hf", f"--checkpoint={tmp_path / 'hf'}",
                  f"--output={tmp_path / 'ours'}") == 0
  params = output_dir.read_params(tmp_path / "ours" / "checkpoint", t5_v10.model.network.config)
  for key, value in t5_v10.flat.items():
    np.testing.assert_array_equal(params[key], value, err_msg=key)


def test_flax_msgpack_weights_read_as_state_dict_names(t5_v10, tmp_path):
  """HF's Flax layout (`flax_model.msgpack`: `kernel` [in, out], `embedding`, norm
  `weight`) reads as the PyTorch names and layout."""
  from flax import serialization
  reference = hf_weights.WeightReader(t5_v10.hf_dir)
  flax_tree = {}
  for name in reference.names():
    value = reference.get(name)
    *parents, _ = name.split(".")
    if name.endswith("layer_norm.weight"):
      leaf = "weight"
    elif parents[-1] in ("shared", "relative_attention_bias"):
      leaf = "embedding"
    else:
      leaf, value = "kernel", value.T
    flax_tree["/".join(parents + [leaf])] = value
  (tmp_path / hf_weights.FLAX).write_bytes(serialization.msgpack_serialize(
      param_trees.unflatten(flax_tree)))
  reader = hf_weights.WeightReader(tmp_path)
  assert reader.names() == reference.names()
  for name in reference.names():
    np.testing.assert_array_equal(reader.get(name), reference.get(name), err_msg=name)


def test_sentencepiece_vocabulary_is_copied_and_bound(tmp_path):
  """An HF T5 directory with `spiece.model`: OUT holds a copy, model.gin binds it
  with T5's 100 extra ids, and the export carries it back."""
  import gin
  import seqio

  from t5xlike.cli import gin_config
  spm = pathlib.Path(__file__).resolve().parents[1] / "tasks" / "embedded" / "spm.model"
  hf_config = transformers.T5Config(vocab_size=8192, d_model=16, d_kv=4, d_ff=16, num_layers=1,
                                    num_heads=2, feed_forward_proj="gated-gelu",
                                    tie_word_embeddings=False)
  hf_dir = hf_reference.save(transformers.T5ForConditionalGeneration(hf_config), tmp_path / "hf")
  (hf_dir / "spiece.model").write_bytes(spm.read_bytes())
  assert _convert("--from=hf", f"--checkpoint={hf_dir}", f"--output={tmp_path / 'ours'}") == 0
  assert (tmp_path / "ours" / "spiece.model").read_bytes() == spm.read_bytes()
  gin_config.configure([str(tmp_path / "ours" / "model.gin")])
  vocabulary = output_dir.configured_model().vocabulary
  gin.clear_config()
  assert isinstance(vocabulary, seqio.SentencePieceVocabulary)
  assert vocabulary.sentencepiece_model_file == str((tmp_path / "ours" / "spiece.model").resolve())
  assert vocabulary.extra_ids == 100 and vocabulary.vocab_size == 8100
  assert _convert("--from=t5xlike", "--to=hf", f"--checkpoint={tmp_path / 'ours' / 'checkpoint'}",
                  f"--output={tmp_path / 'back'}") == 0
  assert (tmp_path / "back" / "spiece.model").read_bytes() == spm.read_bytes()
  assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())["extra_ids"] == 100


def test_conversion_imports_no_torch_transformers_or_tensorflow(t5_v10, tmp_path):
  """HF -> t5xlike -> HF in a fresh interpreter loads neither PyTorch nor TensorFlow."""
  import subprocess
  import sys
  code = (f"import sys\nfrom t5xlike import convert\n"
          f"assert convert.main(['--from=hf', '--checkpoint={t5_v10.hf_dir}', "
          f"'--output={tmp_path / 'ours'}']) == 0\n"
          "bad = [m for m in ('torch', 'transformers', 'tensorflow') if m in sys.modules]\n"
          "print('loaded:', bad)\nsys.exit(1 if bad else 0)\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert (tmp_path / "ours" / "model.gin").exists()

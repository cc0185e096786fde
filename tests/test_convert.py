"""`python -m t5xlike.convert`: Hugging Face T5 / Llama and T5X checkpoints in and out.

References: random small `transformers` models (PyTorch, CPU, float32) built
and saved here (no hub); T5X checkpoints written here with TensorStore +
msgpack in T5X's layout (and with orbax).
"""
import json
import logging
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from t5xlike import convert, infer  # pylint: disable=g-import-not-at-top
from t5xlike.data import feature_converters
from t5xlike.interop import hf_weights, network_shapes, output_dir, param_trees, t5x_format
from tests import hf_reference

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
  import gin  # pylint: disable=g-import-not-at-top
  from t5xlike import config  # pylint: disable=g-import-not-at-top
  config.configure([str(out_dir / "model.gin")])
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
  return loaded.eval(), info, records.messages + [printed.out, printed.err]


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
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
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
  np.testing.assert_allclose(_hf_t5_logits(loaded, imported.batch), imported.logits,
                             atol=TOL, rtol=0)


def test_export_llama_to_transformers(llama, tmp_path, capfd):
  loaded, info, warnings = _export(llama, tmp_path, capfd)
  assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
  assert not _weights_warnings(warnings), warnings
  np.testing.assert_allclose(hf_reference.llama_logits(loaded, llama.batch["decoder_input_tokens"]),
                             llama.logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["t5_v11", "llama"])
def test_round_trip_ours_hf_ours_is_exact(name, request, tmp_path):
  imported = request.getfixturevalue(name)
  assert _convert("--from=t5xlike", "--to=hf", f"--checkpoint={imported.out_dir / 'checkpoint'}",
                  f"--output={tmp_path / 'hf'}") == 0
  assert _convert("--from=hf", f"--checkpoint={tmp_path / 'hf'}",
                  f"--output={tmp_path / 'back'}") == 0
  back = output_dir.read_params(tmp_path / "back" / "checkpoint", imported.model.network.config)
  assert sorted(back) == sorted(imported.flat)
  for key, value in imported.flat.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  assert (tmp_path / "back" / "model.gin").read_text() == (
      imported.out_dir / "model.gin").read_text()

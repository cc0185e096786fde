"""`python -m t5xlike.convert` for the checkpoint families fine-tuned today: Llama 3.x
(RoPE 'llama3' scaling), Qwen2 / Qwen2.5 (q/k/v biases), Mistral, umT5 (a relative
position table per layer), and what each refuses.

References: random small `transformers` models built here (`tests/hf_reference.py`, no
hub); logits within 1e-4 and ours -> HF -> ours bit-identical, as `tests/test_convert.py`
checks T5 and Llama.
"""
import json

import numpy as np
import pytest

from t5xlike.interop import hf_llama
from t5xlike.models import rope

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Both import torch and transformers (skipped above); test_convert's helpers are shared.
from tests import hf_reference, test_convert  # noqa: E402

TOL = test_convert.TOL
_import, _batch = test_convert._import, test_convert._llama_batch


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
  return _import(tmp_path_factory, "llama3", hf_reference.llama3_model(), _batch())


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  return _import(tmp_path_factory, "qwen2", hf_reference.qwen2_model(), _batch(3))


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
  return _import(tmp_path_factory, "mistral", hf_reference.mistral_model(), _batch(4))


@pytest.fixture(scope="module")
def umt5(tmp_path_factory):
  return _import(tmp_path_factory, "umt5", hf_reference.umt5_model(), test_convert._t5_batch())


def _hf_logits(imported, model=None):
  return hf_reference.llama_logits(model or imported.hf_model,
                                   imported.batch["decoder_input_tokens"])


def test_llama3_frequencies_equal_transformers():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  config = hf_reference.llama3_model().config
  expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config)
  scaling = rope.Llama3Scaling(8.0, 1.0, 4.0, 64)
  ours = rope.inverse_frequencies(8, 500.0, scaling)
  np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=0)
  assert attention_factor == 1.0
  plain = rope.inverse_frequencies(8, 500.0)
  # One pair kept, one interpolated, two slowed down by the factor.
  np.testing.assert_allclose(ours[[0, 2, 3]], plain[[0, 2, 3]] / [1, 8, 8], rtol=1e-12)
  assert plain[1] / 8 < ours[1] < plain[1]


def test_hf_llama3_import_matches_transformers(llama3):
  cfg = llama3.model.network.config
  assert (cfg.rope_type, cfg.rope_max_wavelength, cfg.rope_factor, cfg.rope_low_freq_factor,
          cfg.rope_high_freq_factor, cfg.rope_original_max_positions) == (
              "llama3", 500.0, 8.0, 1.0, 4.0, 64)
  assert "rope_type = 'llama3'" in (llama3.out_dir / "model.gin").read_text()
  expected = _hf_logits(llama3)
  np.testing.assert_allclose(llama3.logits, expected, atol=TOL, rtol=0)
  # The scaling matters at these positions: plain RoPE is far off.
  assert np.abs(_plain_rope_logits(llama3) - expected).max() > 100 * TOL


def _plain_rope_logits(imported):
  import dataclasses

  from t5xlike.interop import network_shapes, param_trees
  cfg = dataclasses.replace(imported.model.network.config, rope_type="default")
  model = network_shapes.model_for(cfg)
  return np.asarray(model.logits(param_trees.unflatten(imported.flat), imported.batch))


def test_hf_qwen2_import_matches_transformers(qwen2):
  cfg = qwen2.model.network.config
  assert cfg.qkv_bias and cfg.rope_max_wavelength == 700.0 and cfg.rope_type == "default"
  layer = qwen2.hf_model.model.layers[1].self_attn
  np.testing.assert_array_equal(qwen2.flat["decoder/layers_1/self_attention/key/bias"],
                                layer.k_proj.bias.detach().numpy())
  assert "decoder/layers_1/self_attention/out/bias" not in qwen2.flat
  np.testing.assert_allclose(qwen2.logits, _hf_logits(qwen2), atol=TOL, rtol=0)


def test_hf_mistral_import_matches_transformers(mistral):
  cfg = mistral.model.network.config
  assert not cfg.qkv_bias and cfg.rope_max_wavelength == 1000.0
  np.testing.assert_allclose(mistral.logits, _hf_logits(mistral), atol=TOL, rtol=0)


@pytest.mark.parametrize("name, flag, model_type", [
    ("llama3", "auto", "llama"), ("qwen2", "auto", "qwen2"), ("mistral", "mistral", "mistral")])
def test_export_families_to_transformers(name, flag, model_type, request, tmp_path, capfd):
  imported = request.getfixturevalue(name)
  out = tmp_path / "exported"
  assert test_convert._convert("--from=t5xlike", "--to=hf", f"--checkpoint={imported.out_dir}",
                  f"--output={out}", f"--hf_model_type={flag}") == 0
  written = json.loads((out / "config.json").read_text())
  assert written["model_type"] == model_type
  if name == "llama3":
    assert written["rope_parameters"] == {
        "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    # transformers < 5 reads rope_scaling (and rope_theta).
    assert written["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}
    assert written["rope_theta"] == 500.0
  loaded, info, warnings = test_convert.load_hf(type(imported.hf_model), out, capfd)
  assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
  assert not test_convert._weights_warnings(warnings) and not warnings, warnings
  np.testing.assert_allclose(_hf_logits(imported, loaded), imported.logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("name, flag", [("llama3", "auto"), ("qwen2", "auto"),
                                        ("mistral", "mistral")])
def test_round_trip_ours_hf_ours_is_exact(name, flag, request, tmp_path):
  _round_trip(request.getfixturevalue(name), tmp_path, flag)


def _round_trip(imported, tmp_path, flag):
  test_convert.round_trip(imported, tmp_path, f"--hf_model_type={flag}")


_LLAMA = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64}


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "qwen2", "use_sliding_window": True},
     "use_sliding_window=true: t5xlike's decoder has no sliding-window attention"),
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768},
     "sliding_window=4096 < max_position_embeddings=32768"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     "rope_type='llama3' without low_freq_factor, high_freq_factor"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}},
     "rope_parameters per layer type (full_attention)"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
    ({"model_type": "gemma"}, "model_type='gemma' is not supported"),
])
def test_unsupported_family_settings_are_one_line_exit_2(changes, message, tmp_path, capsys):
  source = tmp_path / "hf"
  source.mkdir()
  (source / "config.json").write_text(json.dumps({**_LLAMA, **changes}))
  assert test_convert._convert("--from=hf", f"--checkpoint={source}",
                               f"--output={tmp_path / 'out'}") == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "out").exists()


def test_llama3_config_of_transformers_4_reads_as_of_transformers_5():
  """Llama 3.1's config.json as released (rope_scaling + rope_theta) and as transformers
  >= 5 saves it (rope_parameters) give the same network; the original context falls
  back to max_position_embeddings, as in transformers."""
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  old = hf_llama.config_from_hf({**_LLAMA, "rope_theta": 500000.0, "rope_scaling": scaling})
  new = hf_llama.config_from_hf({**_LLAMA, "rope_parameters": {**scaling,
                                                               "rope_theta": 500000.0}})
  assert old == new and old.rope_llama3 == rope.Llama3Scaling(8.0, 1.0, 4.0, 8192)
  assert old.rope_max_wavelength == 500000.0
  del scaling["original_max_position_embeddings"]
  short = hf_llama.config_from_hf({**_LLAMA, "rope_scaling": scaling})
  assert short.rope_original_max_positions == _LLAMA["max_position_embeddings"]


def test_mistral_window_as_long_as_the_context_imports_as_causal():
  cfg = hf_llama.config_from_hf({**_LLAMA, "model_type": "mistral", "sliding_window": 64})
  assert not cfg.qkv_bias


@pytest.mark.parametrize("name, flag, message", [
    ("qwen2", "llama", "--hf_model_type=llama: the network has q/k/v biases"),
    ("mistral", "qwen2", "--hf_model_type=qwen2: the network has no q/k/v biases"),
    ("umt5", "llama", "--hf_model_type=llama is for decoder-only networks"),
])
def test_export_to_a_family_that_cannot_hold_the_network_is_refused(name, flag, message, request,
                                                                    tmp_path, capsys):
  imported = request.getfixturevalue(name)
  assert test_convert._convert("--from=t5xlike", "--to=hf", f"--checkpoint={imported.out_dir}",
                  f"--output={tmp_path / 'out'}", f"--hf_model_type={flag}") == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "out").exists()
  assert not list(tmp_path.glob(".out*"))


def _hf_t5_logits(imported, model=None):
  return hf_reference.t5_logits(model or imported.hf_model, imported.batch["encoder_input_tokens"],
                                imported.batch["decoder_input_tokens"])


def test_hf_umt5_import_matches_transformers(umt5):
  cfg = umt5.model.network.config
  assert cfg.relative_attention_per_layer and not cfg.logits_via_embedding
  assert "encoder/relpos_bias/rel_embedding" not in umt5.flat
  hf_table = umt5.hf_model.decoder.block[1].layer[0].SelfAttention.relative_attention_bias
  np.testing.assert_array_equal(umt5.flat["decoder/layers_1/relpos_bias/rel_embedding"],
                                hf_table.weight.detach().numpy().T)
  np.testing.assert_allclose(umt5.logits, _hf_t5_logits(umt5), atol=TOL, rtol=0)


def test_export_umt5_to_transformers(umt5, tmp_path, capfd):
  out = tmp_path / "exported"
  assert test_convert._convert("--from=t5xlike", "--to=hf", f"--checkpoint={umt5.out_dir}",
                               f"--output={out}") == 0
  assert json.loads((out / "config.json").read_text())["model_type"] == "umt5"
  loaded, info, warnings = test_convert.load_hf(type(umt5.hf_model), out, capfd)
  assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
  # transformers >= 5 always ties umT5's lm_head too: an untied head loads with that warning.
  assert warnings and all("will NOT tie them" in w for w in warnings), warnings
  np.testing.assert_allclose(_hf_t5_logits(umt5, loaded), umt5.logits, atol=TOL, rtol=0)


def test_umt5_round_trip_ours_hf_ours_is_exact(umt5, tmp_path):
  _round_trip(umt5, tmp_path, "auto")


def test_umt5_cached_decoding_equals_whole_sequence_logits(umt5):
  """Per-layer tables at the cache's positions: the logits of decoding step by step
  (the model's decoding protocol) equal those of the whole target sequence."""
  from t5xlike.interop import param_trees
  model, batch = umt5.model, umt5.batch
  params = param_trees.unflatten(umt5.flat)
  inputs = batch["decoder_input_tokens"]
  state, first = model.decoding_start(params, batch, max_length=inputs.shape[1] - 1)
  steps = [np.asarray(first)]
  for t in range(1, inputs.shape[1]):
    logits, state = model.decoding_step(params, inputs[:, t:t + 1], state)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.stack(steps, 1), umt5.logits, atol=1e-5, rtol=0)


def test_umt5_scanned_layers_hold_their_own_tables(umt5, tmp_path):
  out = tmp_path / "scanned"
  assert test_convert._convert("--from=hf", f"--checkpoint={umt5.hf_dir}", f"--output={out}",
                               "--scan_layers=true") == 0
  logits, model, flat = test_convert._our_logits(out, umt5.batch)
  assert model.network.config.scan_layers and sorted(flat) == sorted(umt5.flat)
  np.testing.assert_allclose(logits, umt5.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_decoder_cached_decoding_equals_whole_sequence_logits(name, request):
  """The KV-cache path (decoding protocol) applies the llama3 frequencies and the q/k/v
  biases as the whole-sequence forward does."""
  from t5xlike.interop import param_trees
  imported = request.getfixturevalue(name)
  model, inputs = imported.model, imported.batch["decoder_input_tokens"]
  params = param_trees.unflatten(imported.flat)
  state, first = model.decoding_start(params, imported.batch, max_length=inputs.shape[1])
  steps = [np.asarray(first)]
  for t in range(1, inputs.shape[1]):
    logits, state = model.decoding_step(params, inputs[:, t:t + 1], state)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.stack(steps, 1), imported.logits, atol=1e-5, rtol=0)


def test_tied_qwen2_imports_and_exports(tmp_path_factory, tmp_path, capfd):
  """Qwen2.5's small models tie the output layer to the embedding."""
  imported = _import(tmp_path_factory, "qwen2_tied", hf_reference.qwen2_model(seed=9, tied=True),
                     _batch(5))
  assert imported.model.network.config.tie_embeddings
  assert "decoder/logits_dense/kernel" not in imported.flat
  np.testing.assert_allclose(imported.logits, _hf_logits(imported), atol=TOL, rtol=0)
  out = tmp_path / "exported"
  assert test_convert._convert("--from=t5xlike", "--to=hf", f"--checkpoint={imported.out_dir}",
                               f"--output={out}") == 0
  loaded, info, warnings = test_convert.load_hf(type(imported.hf_model), out, capfd)
  assert not (info["missing_keys"] or info["unexpected_keys"] or warnings), (info, warnings)
  np.testing.assert_allclose(_hf_logits(imported, loaded), imported.logits, atol=TOL, rtol=0)

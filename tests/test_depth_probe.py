"""`--estimate=probe` (aot.depth_probe): a deep step's time from the unrolled step at two
shallow depths. The arithmetic and the model surgery run without a compiler; the
estimate itself is checked against libtpu's figure for the unrolled deep step."""
import importlib.util
import json

import numpy as np
import pytest

from t5xlike import compile as compile_command, flops
from t5xlike.aot import depth_probe
from t5xlike.cli import gin_config
from t5xlike.finetuning import lora, peft
from t5xlike.runs import compile_run

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")


def configured_model(gin_file, overrides=()):
  gin_config.configure([gin_file], list(overrides))
  return compile_run.train_arguments(("model",))["model"]


def test_equal_stacks_are_probed_together_unequal_ones_apart():
  assert depth_probe.probe_points({"num_layers": 32}) == [{"num_layers": 2}, {"num_layers": 4}]
  both = {"num_encoder_layers": 24, "num_decoder_layers": 24}
  assert depth_probe.probe_points(both) == [dict.fromkeys(both, 2), dict.fromkeys(both, 4)]
  assert depth_probe.probe_points({"num_encoder_layers": 12, "num_decoder_layers": 6}) == [
      {"num_encoder_layers": 2, "num_decoder_layers": 2},
      {"num_encoder_layers": 4, "num_decoder_layers": 2},
      {"num_encoder_layers": 4, "num_decoder_layers": 4}]


@pytest.mark.parametrize("depths", [{"num_layers": 32},
                                    {"num_encoder_layers": 24, "num_decoder_layers": 24},
                                    {"num_encoder_layers": 12, "num_decoder_layers": 5}])
def test_extrapolation_recovers_a_step_linear_in_each_stack(depths):
  """t = c + sum_s slope_s * layers_s, sampled at the probe points, is recovered exactly at
  the full depths (float64 reference)."""
  rng = np.random.default_rng(len(depths) + sum(depths.values()))
  constant, slopes = rng.uniform(0.1, 1.0), dict(zip(depths, rng.uniform(0.01, 0.1, 2)))
  time = lambda point: constant + sum(slopes[name] * layers for name, layers in point.items())
  points = depth_probe.probe_points(depths)
  estimate = depth_probe.extrapolate(depths, points, [time(p) for p in points])
  assert estimate == pytest.approx(time(depths), rel=1e-12)


def test_with_depth_copies_the_model_unrolled_at_the_new_depth():
  model = configured_model("quickstart.gin", [("t5.T5Config.scan_layers", "True")])
  shallow = depth_probe.with_depth(model, {"num_encoder_layers": 4, "num_decoder_layers": 3})
  cfg, original = flops.network_config(shallow), flops.network_config(model)
  assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.scan_layers) == (4, 3, False)
  assert (original.num_encoder_layers, original.scan_layers) == (2, True)
  assert cfg.emb_dim == original.emb_dim and shallow.vocabulary is model.vocabulary
  assert depth_probe.stack_depths(model) == {"num_encoder_layers": 2, "num_decoder_layers": 2}


def test_with_depth_keeps_a_peft_interceptor_around_the_new_network():
  model = peft.wrap_model(configured_model("objectives/causal_lm.gin"), lora.LoRA(rank=2))
  shallow = depth_probe.with_depth(model, {"num_layers": 5})
  assert isinstance(shallow.network, peft.InterceptedNetwork)
  assert shallow.network.config.num_layers == 5 and model.network.config.num_layers == 2
  assert shallow.peft_method is model.peft_method


def test_a_model_without_one_network_cannot_be_probed():
  with pytest.raises(ValueError, match="no single network"):
    depth_probe.stack_depths(configured_model("objectives/electra.gin"))


def report_of(topology, flags, estimate):
  gin_config.configure(["objectives/causal_lm.gin"], [tuple(f.split("=", 1)) for f in flags])
  return compile_run.compile_step(topology, estimate=estimate)


@pytest.mark.slow   # four compiles: ~1.5 min idle, 4 min on a loaded 2-core host
@needs_libtpu
def test_the_probe_matches_libtpu_on_the_unrolled_deep_step():
  """A 6-layer tiny decoder on v5e:2x2: the probe (2 and 4 layers, unrolled) extrapolates
  to within 5% of libtpu's figure for the 6-layer step unrolled (no loop to scale).
  Measured: 0.386 against 0.378 ms (the loop scaling: 0.774); at 8 layers with Pallas
  attention 0.531 against 0.521 ms (the loop scaling: 1.15)."""
  flags = ["BATCH_SIZE=8", "ACTIVATION_DTYPE='bfloat16'", "decoder.DecoderConfig.num_layers=6",
           "decoder.DecoderConfig.attention_impl='einsum'", "TASK_FEATURE_LENGTHS={'targets': 128}"]
  probed = report_of("v5e:2x2", flags + ["decoder.DecoderConfig.scan_layers=True"], "probe")
  unrolled = report_of("v5e:2x2", flags + ["decoder.DecoderConfig.scan_layers=False"], "loops")
  assert unrolled.loop_expansion == pytest.approx(1.0) and unrolled.step_seconds
  assert [dict(p) for p in probed.probe.points] == [{"num_layers": 2}, {"num_layers": 4}]
  assert probed.step_seconds == probed.probe.step_seconds
  assert probed.probe.seconds[0] < probed.probe.seconds[1] < probed.step_seconds
  assert probed.step_seconds == pytest.approx(unrolled.step_seconds, rel=0.05)
  row = json.loads(probed.json_line())
  assert row["estimated_step_s"] == probed.step_seconds
  assert row["loop_scaled_step_s"] == probed.loop_scaled_seconds
  assert row["depth_probe"]["seconds"] == list(probed.probe.seconds)


@pytest.mark.parametrize("flags,message", [
    (["--topology=v5e:2x2", "--estimate=cycles"], "--estimate must be one of"),
    (["--topology=v5e:2x2", "--estimate=probe", "--gin_file=objectives/electra.gin"],
     "has no single network to probe"),
])
def test_bad_estimate_is_one_line_exit_2(flags, message, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  gin_file = next((f for f in flags if f.startswith("--gin_file")),
                  "--gin_file=objectives/causal_lm.gin")
  flags = [f for f in flags if f != gin_file]
  code = compile_command.main([gin_file, "--gin.BATCH_SIZE=8", *flags])
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and message in lines[0], captured.err
  assert captured.out == "" and list(tmp_path.iterdir()) == []

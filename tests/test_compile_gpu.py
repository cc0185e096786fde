"""python -m t5xlike.compile for GPU nodes that are not here: the real train step compiled by
JAX's CUDA plugin (the `gpu` extra) for compile-only H100s on this CPU host (the tests run
with JAX_PLATFORMS=cpu, tests/conftest.py), with cuDNN's fused attention."""
import importlib.util
import json
import pathlib

import pytest

from t5xlike import compile as compile_command
from t5xlike.aot import targets
from t5xlike.cli import gin_config
from t5xlike.runs import compile_run

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("jax_plugins.xla_cuda12") is None,
    reason="JAX's CUDA plugin is not installed (pip install -e '.[gpu]')")

ADAMW = str(pathlib.Path(__file__).parent / "gin" / "adamw.gin")
BF16_CUDNN = [("ACTIVATION_DTYPE", "'bfloat16'"), ("BATCH_SIZE", "16")]


def compiled(gin_files, overrides, topology):
  gin_config.configure(gin_files, list(overrides))
  plan = compile_run.plan_compile(topology)
  return plan, compile_run.execute(plan)


@pytest.fixture(scope="module")
def t5_cudnn():
  """The tiny T5 in bfloat16 with the cuDNN route on one H100 node, data parallel over 8."""
  return compiled(["quickstart.gin", ADAMW], BF16_CUDNN + [
      ("t5.T5Config.attention_impl", "'cudnn'"),
      ("TASK_FEATURE_LENGTHS", "{'inputs': 128, 'targets': 64}")], "h100-8")


@pytest.fixture(scope="module")
def decoder_cudnn():
  """The tiny decoder (GQA, causal) in bfloat16, 'auto' attention, fsdp over 8 H200s."""
  return compiled(["objectives/causal_lm.gin"], BF16_CUDNN + [
      ("MESH_SHAPE", "{'fsdp': 8}"), ("LOGICAL_AXIS_RULES", "'fsdp'")], "h200-8")


def test_t5_biased_attention_takes_cudnn_fused_attention(t5_cudnn):
  _, report = t5_cudnn
  assert report.device_kind == "NVIDIA H100 80GB HBM3" and report.target.chips == 8
  # Per layer: encoder self-attention (with the relative-position bias), decoder
  # self-attention (bias, causal), cross-attention; forward and backward each.
  assert report.cudnn_attention_kernels == 2 * 3 * 2
  assert report.attention_fallbacks == ()


def test_gpu_report_memory_and_roofline(t5_cudnn):
  plan, report = t5_cudnn
  row = json.loads(report.json_line())
  assert row["platform"] == "gpu" and row["bytes_per_chip"]["hbm"] == 80 * 2 ** 30
  assert row["fits"] is True
  # Parameters and AdamW's two moments, replicated (data parallel), in float32.
  params = report.figures.params_bytes
  assert report.figures.opt_state_bytes == pytest.approx(2 * params, abs=64)
  assert abs(report.memory["argument"] - report.figures.batch_bytes - 3 * params) <= 0.3 * params
  # No cost model on GPUs: the estimate is the roofline's largest term.
  assert report.step_seconds == max(report.roofline.values()) > 0
  assert "roofline (ours" in report.estimate_source
  assert report.compiler_flops and report.bytes_accessed   # XLA's HLO cost analysis
  assert set(report.stats.collectives) == {"all-reduce"}     # gradients over data
  assert report.mfu == pytest.approx(report.figures.model_flops / report.step_seconds
                                     / (8 * 989e12))


@pytest.mark.slow  # ~20 s; the T5 cuDNN compile stays in the default run
def test_decoder_auto_attention_takes_cudnn_on_gpus(decoder_cudnn):
  plan, report = decoder_cudnn
  assert report.device_kind == "NVIDIA H200" and report.memory["hbm"] == 141 * 2 ** 30
  assert report.cudnn_attention_kernels == 2 * 2   # 2 layers, forward and backward
  assert dict(plan.partitioner.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert "all-gather" in report.stats.collectives   # FSDP gathers the parameters


def test_missing_cuda_plugin_is_one_line_naming_the_install(capsys, monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(targets.importlib.util, "find_spec",
                      lambda name: None if name == "jax_plugins.xla_cuda12" else find_spec(name))
  code = compile_command.main(["--gin_file=objectives/causal_lm.gin", "--topology=2xh100-8"])
  lines = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and lines == [
      "error: compiling for 2xh100-8 needs JAX's CUDA plugin (the GPU compiler): "
      "pip install -e '.[gpu]'"]


@pytest.mark.slow
def test_two_hosts_with_a_dcn_mesh():
  plan, report = compiled(["objectives/causal_lm.gin"], BF16_CUDNN + [
      ("MESH_SHAPE", "{'fsdp': 8}"), ("LOGICAL_AXIS_RULES", "'fsdp'"),
      ("DCN_MESH_SHAPE", "{'data': 2}")], "2xh100-8")
  assert report.target.chips == 16 and report.figures.dcn_mesh == {"data": 2}
  mesh = plan.partitioner.mesh
  assert dict(mesh.shape) == {"data": 2, "fsdp": 8, "tensor": 1}
  # Each host's 8 GPUs form the fsdp axis; the data axis crosses hosts.
  assert [{d.process_index for d in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]
  assert report.fits and report.cudnn_attention_kernels == 4


def test_gpu_depth_probe_extrapolates_the_hbm_traffic_of_the_unrolled_step():
  """XLA's GPU cost analysis counts a loop body once, so on GPUs the default estimate
  ('auto' = `--estimate=probe`) takes the HBM term from the step unrolled at 2 and 4
  layers: for 6 layers it equals (within 5%) the 6-layer step compiled unrolled, whose
  bytes accessed count every layer."""
  base = ["objectives/causal_lm.gin"]
  overrides = BF16_CUDNN + [("MESH_SHAPE", "{'fsdp': 8}"), ("LOGICAL_AXIS_RULES", "'fsdp'"),
                            ("decoder.DecoderConfig.num_layers", "6")]
  _, unrolled = compiled(base, overrides + [("decoder.DecoderConfig.scan_layers", "False")],
                         "h100-8")
  exact = unrolled.bytes_accessed / targets.CHIPS["h100"].hbm_bytes_per_s
  gin_config.configure(base, overrides + [("decoder.DecoderConfig.scan_layers", "True")])
  report = compile_run.compile_step("h100-8")
  assert report.probe is not None and report.probe.term == "hbm"
  assert [p["num_layers"] for p in report.probe.points] == [2, 4]
  assert report.roofline["hbm_s"] == report.probe.step_seconds
  assert report.probe.step_seconds == pytest.approx(exact, rel=0.05)
  assert report.step_seconds == max(report.roofline.values())
  assert "unrolled step at shallow depths" in report.estimate_source

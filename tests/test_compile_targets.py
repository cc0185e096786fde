"""t5xlike.aot.targets (accelerator names -> slices), t5xlike.aot.hlo_stats (collectives
and kernels per step in optimised HLO text) and the figures of t5xlike.aot.step_report that
need no compiled step: no compiler; scripts/gpu_mfu.py's refusal of a machine without an
H100 / H200 and scripts/scale_table.py's table."""
import dataclasses
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

from t5xlike.aot import hlo_stats, step_report, targets
from t5xlike.aot.targets import GIB


@pytest.mark.parametrize("name,chip,shape", [
    ("v4-8", "v4", (2, 2, 1)), ("v4-16", "v4", (2, 2, 2)), ("v4-32", "v4", (2, 2, 4)),
    ("v4-64", "v4", (2, 4, 4)), ("v4-128", "v4", (4, 4, 4)), ("v4-256", "v4", (4, 4, 8)),
    ("v4-512", "v4", (4, 8, 8)), ("v4-1024", "v4", (8, 8, 8)), ("v4-2048", "v4", (8, 8, 16)),
    ("v5p-128", "v5p", (4, 4, 4)), ("v5p-8", "v5p", (2, 2, 1)),
    ("v5litepod-16", "v5e", (4, 4)), ("v5litepod-8", "v5e", (2, 4)),
    ("v5e-256", "v5e", (16, 16)), ("v5litepod-1", "v5e", (1, 1)),
    ("v6e-256", "v6e", (16, 16)), ("v6e-64", "v6e", (8, 8)),
    ("v5p:4x4x12", "v5p", (4, 4, 12)), ("v5e:2x2", "v5e", (2, 2)), ("V4:2x2x1", "v4", (2, 2, 1)),
])
def test_cloud_tpu_names_give_the_published_slice_shapes(name, chip, shape):
  # Cloud TPU's shapes (v4 / v5p names count 2 TensorCores per chip).
  target = targets.parse_target(name)
  assert (target.chip.name, target.shape, target.chips) == (chip, shape, math.prod(shape))


def test_libtpu_topology_names_and_slices():
  target = targets.parse_target("v5p-128", num_slices=2)
  assert target.libtpu_topology == "v5p:4x4x4"
  assert (target.chips_per_slice, target.chips) == (64, 128)
  assert targets.parse_target("v5litepod-64").libtpu_topology == "v5e:8x8"


@pytest.mark.parametrize("name,chip,hosts,per_host", [
    ("h100-8", "h100", 1, 8), ("2xh100-8", "h100", 2, 8), ("h200-8", "h200", 1, 8),
    ("a100-4", "a100", 1, 4), ("4xb200-8", "b200", 4, 8)])
def test_gpu_node_names(name, chip, hosts, per_host):
  target = targets.parse_target(name)
  assert (target.chip.name, target.shape, target.chips) == (chip, (hosts, per_host),
                                                            hosts * per_host)
  assert target.chip.platform == "gpu"


@pytest.mark.parametrize("name,message", [
    ("v7-8", "unknown topology 'v7-8'"), ("tpu-8", "known forms"),
    ("v4-6", "not a standard slice"), ("v4-7", "2 TensorCores per chip"),
    ("v5litepod-12", "not a standard slice"), ("v5p:4x4", "3 dimensions"),
    ("h100-16", "1 to 8 GPUs per host")])
def test_unknown_or_irregular_names_are_value_errors_naming_the_forms(name, message):
  with pytest.raises(ValueError, match=message):
    targets.parse_target(name)


def test_gpu_hosts_are_not_slices():
  with pytest.raises(ValueError, match="not --num_slices"):
    targets.parse_target("h100-8", num_slices=2)


def test_chip_figures_are_the_data_sheet_ones():
  chips = targets.CHIPS
  assert [(c, chips[c].peak_bf16_tflops, chips[c].hbm_bytes / 2 ** 30)
          for c in ("v4", "v5e", "v5p", "v6e")] == [
              ("v4", 275.0, 32), ("v5e", 197.0, 16), ("v5p", 459.0, 95), ("v6e", 918.0, 32)]
  assert chips["h100"].hbm_bytes == 80 * 2 ** 30 and chips["h200"].hbm_bytes == 141 * 2 ** 30


@pytest.mark.parametrize("chip", ["h100", "h200", "a100", "b200"])
def test_gpu_target_configs_ship_with_the_package(chip):
  text = targets.gpu_target_config(chip)
  assert 'platform_name: "CUDA"' in text and "cuda_compute_capability" in text
  major = {"a100": 8, "h100": 9, "h200": 9, "b200": 10}[chip]
  assert f"major: {major} " in text
  size = int(text.split("device_memory_size:")[1].split()[0])
  assert size == targets.CHIPS[chip].hbm_bytes


def test_missing_compiler_names_the_install_command(monkeypatch):
  monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None)
  assert "pip install -e '.[tpu]'" in targets.missing_support(targets.parse_target("v4-8"))
  assert "pip install -e '.[gpu]'" in targets.missing_support(targets.parse_target("h100-8"))
  with pytest.raises(ValueError, match="needs libtpu"):
    targets.compile_devices(targets.parse_target("v5e:2x2"))


# An optimised module as XLA prints it: a scan of 6 steps (known trip count) whose body
# all-gathers a [4, 256] bf16 shard to [16, 256] and starts an async all-reduce of 1,024
# f32; a reduce-scatter of an f32[64] operand in the entry; a custom call inside a fusion
# and one that is a kernel of its own; a loop without a known trip count.
HLO = """HloModule jit_step, entry_computation_layout={(f32[64]{0})->f32[16]{0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%fused_inner (p: bf16[16,256]) -> bf16[16,256] {
  %p = bf16[16,256]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %cc = bf16[16,256]{1,0} custom-call(%p), custom_call_target="AssumeGatherIndicesInBound"
}

%body (state: (s32[], bf16[4,256], f32[1024])) -> (s32[], bf16[4,256], f32[1024]) {
  %state = (s32[], bf16[4,256]{1,0}, /*index=2*/f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %shard = bf16[4,256]{1,0} get-tuple-element(%state), index=1
  %acc = f32[1024]{0} get-tuple-element(%state), index=2
  %gathered = bf16[16,256]{1,0:T(8,128)(2,1)} all-gather(%shard), replica_groups=[1,4]<=[4]
  %fusion.1 = bf16[16,256]{1,0} fusion(%gathered), kind=kLoop, calls=%fused_inner
  %ar-start = f32[1024]{0} all-reduce-start(%acc), replica_groups={{0,1,2,3}}, to_apply=%add
  %ar-done = f32[1024]{0} all-reduce-done(%ar-start)
  ROOT %out = (s32[], bf16[4,256]{1,0}, f32[1024]{0}) tuple(%i, %shard, %ar-done)
}

%cond (state: (s32[], bf16[4,256], f32[1024])) -> pred[] {
  %state = (s32[], bf16[4,256]{1,0}, f32[1024]{0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

%body2 (s: f32[8]) -> f32[8] {
  %s = f32[8]{0} parameter(0)
  ROOT %perm = f32[8]{0} collective-permute(%s), channel_id=3, source_target_pairs={{0,1},{1,0}}
}

%cond2 (s: f32[8]) -> pred[] {
  %s = f32[8]{0} parameter(0)
  ROOT %t = pred[] constant(false)
}

ENTRY %main (param: f32[64], init: (s32[], bf16[4,256], f32[1024]), v: f32[8]) -> f32[16] {
  %param = f32[64]{0} parameter(0)
  %init = (s32[], bf16[4,256]{1,0}, f32[1024]{0}) parameter(1)
  %v = f32[8]{0} parameter(2)
  %loop = (s32[], bf16[4,256]{1,0}, f32[1024]{0}) while(%init), condition=%cond, body=%body, TRIP
  %loop2 = f32[8]{0} while(%v), condition=%cond2, body=%body2
  %kernel = f32[64]{0:S(1)} custom-call(%param), custom_call_target="ConcatBitcast"
  ROOT %rs = f32[16]{0} reduce-scatter(%kernel), dimensions={0}, to_apply=%add
}
""".replace("TRIP", 'backend_config={"known_trip_count":{"n":"6"}}')


def test_collectives_count_loop_trips_and_full_buffers():
  stats = hlo_stats.hlo_stats(HLO)
  assert stats.collectives == {
      "all-gather": (6, 6 * 16 * 256 * 2.0),   # the gathered result, per trip
      "all-reduce": (6, 6 * 1024 * 4.0),       # async: the -start counts, once per trip
      "reduce-scatter": (1, 64 * 4.0),         # the operand before scattering
      "collective-permute": (1, 8 * 4.0),      # unknown trip count: once
  }
  assert stats.collective_bytes == 6 * 8192 + 6 * 4096 + 256 + 32
  assert stats.custom_calls == {"AssumeGatherIndicesInBound": 6, "ConcatBitcast": 1}
  assert stats.kernel_custom_calls == {"ConcatBitcast": 1}   # the other is inside a fusion
  assert stats.kernel_custom_call_sites == {"ConcatBitcast": 1}
  assert stats.unknown_trip_counts == 1


DCN_HLO = """HloModule jit_step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: f32[256]) -> f32[256] {
  %p = f32[256]{0} parameter(0)
  %token = token[] after-all()
  %send = (f32[256]{0}, u32[], token[]) send(%p, %token), channel_id=4, is_host_transfer=true, \
frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",\
_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv = (f32[256]{0}, u32[], token[]) recv(%token), channel_id=3, is_host_transfer=true, \
frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %out = f32[256]{0} get-tuple-element(%recv), index=0
}

%cond (p: f32[256]) -> pred[] {
  %p = f32[256]{0} parameter(0)
  ROOT %t = pred[] constant(false)
}

ENTRY %main (v: f32[256], w: bf16[64]) -> f32[256] {
  %v = f32[256]{0} parameter(0)
  %w = bf16[64]{0} parameter(1)
  %t = token[] after-all()
  %send.2 = (bf16[64]{0}, u32[], token[]) send(%w, %t), channel_id=5, is_host_transfer=true, \
frontend_attributes={_xla_megascale_transfer_type="ALL_GATHER"}
  %loop = f32[256]{0} while(%v), condition=%cond, body=%body, \
backend_config={"known_trip_count":{"n":"3"}}
  ROOT %ar = f32[256]{0} all-reduce(%loop), replica_groups={{0,1}}, to_apply=%add
}
"""  # a backslash at a line's end joins it to the next


def test_transfers_between_slices_count_as_dcn_collectives():
  """Multi-slice collectives are megascale host transfers: each `send` counts (per loop
  trip) under 'dcn-' + its transfer type, apart from the collectives over the links."""
  stats = hlo_stats.hlo_stats(DCN_HLO)
  assert stats.collectives == {"dcn-all-reduce": (3, 3 * 256 * 4.0),
                               "dcn-all-gather": (1, 64 * 2.0),
                               "all-reduce": (1, 256 * 4.0)}
  assert stats.dcn_bytes == 3 * 1024 + 128 and stats.collective_bytes == 1024


def test_dcn_time_is_a_ring_all_reduce_at_the_chips_share_of_the_network():
  v5p = targets.parse_target("v5p-8", num_slices=2)    # 50 Gb/s per chip
  assert step_report.dcn_seconds(6.25e9, v5p) == pytest.approx(1.0)
  four = targets.parse_target("v5p-8", num_slices=4)
  assert step_report.dcn_seconds(6.25e9, four) == pytest.approx(1.5)   # 2 (n - 1) / n
  step, source = step_report.with_dcn(0.5, "libtpu", 1.0, v5p)
  assert step == 1.5 and "transfers between slices at 50 Gb/s" in source
  v4 = targets.parse_target("v4-8", num_slices=2)      # no published DCN bandwidth
  assert math.isinf(step_report.dcn_seconds(1e6, v4))
  step, source = step_report.with_dcn(0.5, "libtpu", math.inf, v4)
  assert step is None and "no published data-center network bandwidth for v4" in source


def test_shape_bytes():
  assert hlo_stats.shape_bytes("bf16[8,128]{1,0:T(8,128)(2,1)}") == 2048
  assert hlo_stats.shape_bytes("(f32[2,3]{1,0}, s32[], /*index=2*/pred[4])") == 24 + 4 + 4
  assert hlo_stats.shape_bytes("token[]") == 0


def test_a_module_without_entry_is_refused():
  with pytest.raises(ValueError, match="no ENTRY"):
    hlo_stats.hlo_stats("%f (x: f32[]) -> f32[] {\n  ROOT %x = f32[] parameter(0)\n}\n")


def test_gpu_mfu_script_refuses_a_machine_without_an_h100_in_one_line():
  script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "gpu_mfu.py"
  result = subprocess.run([sys.executable, str(script), "--dry_run"], capture_output=True,
                          text=True, timeout=300, check=False)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and "needs an NVIDIA H100 or H200" in lines[0]
  assert result.stdout == ""


def _figures(**changes):
  figures = step_report.StepFigures(
      model_name="tiny", mesh={"data": 4}, dcn_mesh={}, rules="data_parallel",
      batch_shapes={"decoder_target_tokens": (8, 128)}, tokens_per_step=1024,
      num_microbatches=1, attention_impl="einsum", params_bytes=3 * GIB,
      opt_state_bytes=GIB, batch_bytes=4096, model_flops=1e15, hardware_flops=1.25e15)
  return dataclasses.replace(figures, **changes)


def test_a_step_refused_for_memory_reports_the_compilers_temporaries():
  """libtpu's RESOURCE_EXHAUSTED names the temporaries it needed; the report adds them to the
  analytic arguments, says the step does not fit and gives no estimate."""
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
             "memory space hbm. Used 140.03G of 15.75G hbm. Exceeded hbm capacity by "
             "124.28G. Total hbm usage >= 140.28G: reserved 256.00M program 136.03G "
             "arguments 4.00G. Output size 4.00G; shares 4.00G with arguments. Program hbm "
             "requirement 136.03G: HLO temporaries (136.03G)")
  target = targets.parse_target("v5e:2x2")
  report = step_report.StepReport.refused_for_memory(
      message, target, _figures(), device_kind="TPU v5 lite", compile_seconds=1.0,
      compile_cpu_seconds=1.0)
  temp = int(136.03 * GIB)
  assert report.memory["temp"] == temp
  assert report.memory["total"] == 4 * GIB + 4096 + temp
  assert report.memory["headroom"] == 16 * GIB - report.memory["total"]
  assert not report.fits and report.step_seconds is None and report.mfu is None
  row = json.loads(report.json_line())
  assert row["out_of_memory"] is True and row["estimated_mfu"] is None
  table = report.table()
  assert "DOES NOT FIT" in table and "refused" in table.splitlines()[0]


def test_mfu_and_tokens_per_second_follow_from_the_estimated_step():
  """MFU = model FLOPs / (step seconds x chips x peak): the remat FLOPs do not count."""
  target = targets.parse_target("v5p-8")   # 4 chips of 459 TFLOP/s
  report = dataclasses.replace(
      step_report.StepReport.refused_for_memory(
          "RESOURCE_EXHAUSTED", target, _figures(), device_kind="TPU v5",
          compile_seconds=0.0, compile_cpu_seconds=0.0),
      out_of_memory=False, step_seconds=2.0)
  assert report.mfu == pytest.approx(1e15 / (2.0 * 4 * 459e12))
  assert report.tokens_per_second_per_chip == pytest.approx(1024 / 2.0 / 4)


def _scale_table_script():
  path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "scale_table.py"
  spec = importlib.util.spec_from_file_location("scale_table", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["scale_table"] = module   # its dataclass looks its module up
  spec.loader.exec_module(module)
  return module


def test_scale_table_marks_estimates_faster_than_the_cost_models_best_matmul(tmp_path):
  script = _scale_table_script()
  row = script.Row("tiny", "models/decoder/1b.gin", "v5p-8", 8, "{'targets': 128}",
                   "{'fsdp': 4}", "fsdp")
  fix = dataclasses.replace(row, remat="none", fixes="remat")

  def report(step_s, compute_s):
    return {"platform": "tpu", "bytes_per_chip": {"params": GIB, "opt_state": GIB,
                                                  "total": 3 * GIB, "hbm": 95 * GIB},
            "fits": True, "estimated_mfu": 0.5, "estimated_step_s": step_s,
            "roofline_s": {"compute_s": compute_s, "hbm_s": 0.1, "collectives_s": 0.0},
            "mosaic_kernels": 6, "attention_fallbacks": [], "collective_bytes_per_step": GIB,
            "compile_s": 10.0, "compile_cpu_s": 5.0}

  out = tmp_path / "table.md"
  # 1.0 s of FLOPs at peak: 1.1 s is faster than 86% of peak allows, 1.2 s is not.
  probed = {**report(1.1, 1.0), "depth_probe": {"seconds": [0.2, 0.3]}}
  script.write_table([(row, report(1.1, 1.0)), (fix, report(1.2, 1.0)),
                      (row, {"error": "timed out after 60 s"}), (row, probed)], out)
  lines = [line for line in out.read_text().splitlines() if line.startswith("| tiny")]
  assert len(lines) == 4
  assert "| 50.0% (loops: see below) |" in lines[0] and "| 1.00 (compute) |" in lines[0]
  assert "(remat: fits the row above)" in lines[1] and "loops" not in lines[1]
  assert "error: timed out after 60 s" in lines[2]
  assert "| 50.0% (probe) |" in lines[3]   # a probed estimate is not the loop scaling's
  assert "## Reading the estimates" in out.read_text()

"""t5xlike.aot.targets (accelerator names -> slices) and t5xlike.aot.hlo_stats (collectives
and kernels per step in optimised HLO text): pure Python, no compiler; and
scripts/gpu_mfu.py's refusal of a machine without an H100 / H200."""
import math
import pathlib
import subprocess
import sys

import pytest

from t5xlike.aot import hlo_stats, targets


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

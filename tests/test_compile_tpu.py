"""python -m t5xlike.compile for TPU slices that are not here: the real train step compiled by
libtpu (the `tpu` extra) on this CPU host, for tiny models (tests/test_compile_targets.py
covers the names and the HLO reading without a compiler).

Each compiled step is shared by the tests of this module (one fixture per configuration);
the preset x topology matrix is `-m slow`."""
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5xlike import compile as compile_command, partitioning
from t5xlike.aot import hlo_stats, targets
from t5xlike.cli import gin_config
from t5xlike.models import attention
from t5xlike.runs import compile_run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -e '.[tpu]')")

DECODER = ["objectives/causal_lm.gin"]   # tiny decoder: 2 layers, 4 heads sharing 2 kv heads
T5 = ["quickstart.gin"]                  # tiny T5.1.1: 2+2 layers, relative-position bias
ADAMW = str(pathlib.Path(__file__).parent / "gin" / "adamw.gin")   # two moments per parameter


def compiled(gin_files, overrides, topology, num_slices=1):
  """(plan, report) of the configured step compiled for `topology`."""
  gin_config.configure(gin_files, list(overrides))
  plan = compile_run.plan_compile(topology, num_slices)
  return plan, compile_run.execute(plan)


@pytest.fixture(scope="module")
def decoder_pallas():
  """The tiny decoder in bfloat16, packed (segment ids), causal, GQA, with the Pallas kernel,
  on v5e:2x2 (4 chips) under data x tensor = 2 x 2 (data_fsdp_tensor)."""
  return compiled(DECODER + [ADAMW], [("ACTIVATION_DTYPE", "'bfloat16'"), ("BATCH_SIZE", "8"),
                            ("decoder.DecoderConfig.attention_impl", "'pallas'"),
                            ("DataConfig.pack", "True"),
                            ("MESH_SHAPE", "{'data': 2, 'tensor': 2}")], "v5e:2x2")


@pytest.fixture(scope="module")
def t5_fsdp():
  """The tiny T5 ('auto' attention) on a v4 slice of 4 chips under the fsdp preset."""
  return compiled(T5 + [ADAMW], [("BATCH_SIZE", "8"), ("MESH_SHAPE", "{'fsdp': 4}"),
                                ("LOGICAL_AXIS_RULES", "'fsdp'")], "v4-8")


def analytic_param_bytes(boxed_params, rules, mesh_shape) -> int:
  """Per-chip parameter bytes from shapes and logical axis names: each dimension divided by
  the mesh axes of the first rule for its name whose axes the array does not use yet."""
  total = 0
  for _, names, shape in partitioning.boxed_leaves(boxed_params):
    used, divisors = set(), []
    for name in names or (None,) * len(shape):
      divisor = 1
      for rule_name, axes in rules:
        if rule_name != name:
          continue
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if used.isdisjoint(axes):
          used.update(axes)
          divisor = math.prod(mesh_shape[a] for a in axes)
          break
      divisors.append(divisor)
    total += math.prod(-(-dim // d) for dim, d in zip(shape, divisors)) * 4  # float32
  return total


def check_bytes(plan, report):
  """Parameters + AdamW's two moments (float32) per chip: the analytic count equals the
  figures from the shardings, and the compiler's arguments (less the batch and scalars)
  are within 10% of it."""
  state = plan.trainer.state_plan(plan.batch_shapes)
  params = analytic_param_bytes(state.boxed_params, plan.partitioner.rules,
                                dict(plan.partitioner.mesh.shape))
  assert report.figures.params_bytes == params
  assert report.figures.opt_state_bytes == pytest.approx(2 * params, abs=64)
  compiler = report.memory["argument"] - report.figures.batch_bytes
  assert abs(compiler - 3 * params) <= 0.1 * 3 * params


def test_pallas_kernel_compiles_through_mosaic_on_a_multichip_mesh(decoder_pallas):
  plan, report = decoder_pallas
  assert report.device_kind == "TPU v5 lite" and report.target.chips == 4
  assert dict(plan.partitioner.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  # Per layer, the forward kernel and the backward's dK/dV and dQ kernels, in the real
  # program (not interpret mode, which would leave no Mosaic custom call).
  assert report.mosaic_kernels == 2 * 3
  assert report.stats.kernel_custom_calls["tpu_custom_call"] == 6
  assert "decoder_segment_ids" in plan.batch_shapes   # packed: the kernel's segment ids


def test_report_fields_and_the_cost_model_estimate(decoder_pallas):
  plan, report = decoder_pallas
  row = json.loads(report.json_line())
  for key in ("topology", "chips", "mesh", "bytes_per_chip", "fits", "model_flops_per_step",
              "compiler_flops_per_chip_loops_once", "loop_expansion", "estimated_step_s",
              "estimated_mfu",
              "estimated_tokens_per_s_per_chip", "collectives", "compile_s"):
    assert key in row, key
  assert row["fits"] is True and row["bytes_per_chip"]["hbm"] == 16 * 2 ** 30
  step = report.step_seconds
  assert step is not None and 0 < step < 1
  # MFU and tokens/s follow from the estimate and the analytic FLOPs.
  assert report.mfu == pytest.approx(report.figures.model_flops / step / (4 * 197e12))
  assert report.tokens_per_second_per_chip == pytest.approx(8 * 128 / step / 4)
  # Gradients are summed over the data axis: all-reduces, executed once per step here.
  assert row["collectives"]["all-reduce"]["count"] > 0
  assert report.compiler_flops > 0
  assert report.loop_expansion == 1.0   # two unscanned layers: no loop
  assert "estimate, not a measurement" in report.table()


def test_per_chip_state_bytes_match_the_shapes_and_shardings(decoder_pallas, t5_fsdp):
  for plan, report in (decoder_pallas, t5_fsdp):
    check_bytes(plan, report)


def test_t5_relative_position_bias_goes_through_the_pallas_kernel_on_tpus(t5_fsdp):
  plan, report = t5_fsdp
  assert report.device_kind == "TPU v4" and report.target.chips == 4
  assert dict(plan.partitioner.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
  # 'auto' on a TPU: the encoder's self-attention (128 positions, the bias as the kernel's
  # `ab`) takes the kernel in both layers (3 kernels each); the decoder's 29 positions
  # are no multiple of 128 and fall back to einsum quietly.
  assert report.mosaic_kernels == 2 * 3
  # FSDP: parameters are all-gathered for the forward and backward passes and the
  # gradients reduce-scattered (XLA may express those as all-reduces).
  kinds = set(report.stats.collectives)
  assert "all-gather" in kinds and kinds & {"reduce-scatter", "all-reduce"}
  assert report.fits and report.step_seconds and report.step_seconds > 0


def test_a_step_too_large_for_the_chip_is_reported_not_raised(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code = compile_command.main([
      "--gin_file=objectives/causal_lm.gin", "--topology=v5e:2x2", "--gin.BATCH_SIZE=8",
      "--gin.LOGICAL_AXIS_RULES='data_parallel'", "--json",
      "--gin.decoder.DecoderConfig.mlp_dim=16777216"])   # 24 GiB of parameters per chip
  out = capsys.readouterr().out.strip().splitlines()
  assert code == 0 and len(out) == 1   # --json: the JSON line alone (the log on stderr)
  row = json.loads(out[0])
  assert row["fits"] is False and row["estimated_step_s"] is None
  mlp = 2 * 3 * 64 * 16777216 * 4   # 2 layers of 3 float32 [64, 2^24] matrices, replicated
  assert mlp < row["bytes_per_chip"]["params"] < mlp + 5e6
  assert row["bytes_per_chip"]["total"] > row["bytes_per_chip"]["hbm"]
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags,message", [
    (["--topology=v7-8"], "--topology: unknown topology 'v7-8'"),
    (["--topology=v5e:2x2", "--gin.MESH_SHAPE={'data': 3}"], "MESH_SHAPE"),
    (["--topology=v5e:2x2", "--gin.BATCH_SIZE=6"], "BATCH_SIZE=6 is not divisible"),
    (["--topology=v5e:2x2", "--num_slices=2", "--gin.DCN_MESH_SHAPE={'data': 4}"],
     "DCN_MESH_SHAPE"),
    ([], "--topology is required"),
])
def test_bad_input_is_one_line_exit_2(flags, message, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code = compile_command.main(["--gin_file=objectives/causal_lm.gin", *flags])
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and message in lines[0], captured.err
  assert captured.out == "" and list(tmp_path.iterdir()) == []


def test_missing_libtpu_is_one_line_naming_the_install(capsys, monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(targets.importlib.util, "find_spec",
                      lambda name: None if name == "libtpu" else find_spec(name))
  code = compile_command.main(["--gin_file=objectives/causal_lm.gin", "--topology=v4-8"])
  lines = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and lines == [
      "error: compiling for v4-8 needs libtpu (the TPU compiler): pip install -e '.[tpu]'"]


def test_loop_trip_counts_multiply_collectives_in_a_real_tpu_program():
  """A scan of 8 steps, each psum-ing a [16, 512] float32 block over 4 chips: XLA's loop
  keeps its trip count and every step's all-reduce counts."""
  devices = targets.compile_devices(targets.parse_target("v5e:2x2"))
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  spec = jax.sharding.PartitionSpec

  def step(x):
    def body(carry, _):
      return jax.lax.psum(jax.numpy.tanh(carry) * 1.5, "x"), None
    return jax.lax.scan(body, x, None, length=8)[0]

  fn = jax.shard_map(step, mesh=mesh, in_specs=spec("x"), out_specs=spec("x"), check_vma=False)
  arg = jax.ShapeDtypeStruct((64, 512), jax.numpy.float32,
                             sharding=jax.sharding.NamedSharding(mesh, spec("x")))
  stats = hlo_stats.hlo_stats(jax.jit(fn).lower(arg).compile().as_text())
  count, size = stats.collectives["all-reduce"]
  assert count == 8 and size == 8 * 16 * 512 * 4


@pytest.mark.slow
@pytest.mark.parametrize("gin_files", [DECODER, T5], ids=["decoder", "t5"])
@pytest.mark.parametrize("topology,rules,mesh", [
    ("v5e:2x2", "data_parallel", "{'data': 4}"), ("v5e:2x2", "fsdp", "{'fsdp': 4}"),
    ("v5e:2x2", "data_fsdp_tensor", "{'data': 2, 'tensor': 2}"),
    ("v4-16", "data_parallel", "{'data': 8}"), ("v4-16", "fsdp", "{'fsdp': 8}"),
    ("v4-16", "data_fsdp_tensor", "{'fsdp': 4, 'tensor': 2}")])
def test_presets_on_v5e_and_v4_slices(gin_files, topology, rules, mesh):
  # Wider than tiny, so that no shard's minor dimension is below a TPU tile's 128 lanes
  # (tile padding would add to the compiler's bytes what the analytic count leaves out).
  network = "t5.T5Config" if gin_files == T5 else "decoder.DecoderConfig"
  wide = [(f"{network}.{name}", value) for name, value in (
      ("emb_dim", "1024"), ("head_dim", "128"), ("mlp_dim", "1024"))]
  plan, report = compiled(gin_files + [ADAMW], [("BATCH_SIZE", "16"), ("MESH_SHAPE", mesh),
                                                ("LOGICAL_AXIS_RULES", repr(rules)), *wide],
                          topology)
  assert report.fits and report.step_seconds and report.step_seconds > 0
  check_bytes(plan, report)


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5p-8", "v6e-4", "v4-8"])
def test_pallas_compiles_for_every_generation(topology):
  _, report = compiled(DECODER, [("ACTIVATION_DTYPE", "'bfloat16'"), ("BATCH_SIZE", "8"),
                                 ("decoder.DecoderConfig.attention_impl", "'pallas'"),
                                 ("MESH_SHAPE", "{'data': 2, 'tensor': 2}")], topology)
  assert report.mosaic_kernels == 6


def test_two_slices_over_dcn():
  """The tiny decoder under fsdp inside each of 2 v5e:2x2 slices: the gradients cross the
  data-center network as megascale all-reduces of each chip's shard (the parameters' bytes
  per chip), timed at v5e's 25 Gb/s per chip on top of libtpu's estimate, which prices those
  host transfers as free: what is left is one slice's step with as many rows per chip."""
  fsdp = [("MESH_SHAPE", "{'fsdp': 4}"), ("LOGICAL_AXIS_RULES", "'fsdp'")]
  plan, report = compiled(DECODER, [("BATCH_SIZE", "16"), *fsdp], "v5e:2x2", num_slices=2)
  assert report.target.chips == 8 and report.figures.dcn_mesh == {"data": 2}
  assert dict(plan.partitioner.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert {d.slice_index for d in plan.partitioner.mesh.devices[0].flat} == {0}
  assert {d.slice_index for d in plan.partitioner.mesh.devices[1].flat} == {1}
  assert "dcn-all-reduce" in report.stats.collectives
  assert report.stats.dcn_bytes == pytest.approx(report.figures.params_bytes, rel=0.1)
  dcn_s = report.roofline["dcn_s"]
  assert dcn_s == pytest.approx(report.stats.dcn_bytes / (25e9 / 8))   # 2 slices: 2(n-1)/n = 1
  assert report.step_seconds and "transfers between slices" in report.estimate_source
  _, one_slice = compiled(DECODER, [("BATCH_SIZE", "8"), *fsdp], "v5e:2x2")
  assert report.step_seconds - dcn_s == pytest.approx(one_slice.step_seconds, rel=0.25)


def test_pallas_block_follows_the_generation_of_the_mesh(monkeypatch):
  """The block size is the target generation's (`PALLAS_BLOCKS`, by the device kind of the
  mesh in context), or the smallest one where it does not divide the lengths."""
  devices = targets.compile_devices(targets.parse_target("v5e:2x2"))
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  monkeypatch.setitem(attention.PALLAS_BLOCKS, "TPU v5 lite", 256)
  with jax.set_mesh(mesh):
    assert attention.pallas_block(512, 1024) == 256
    assert attention.pallas_block(384, 512) == attention.PALLAS_BLOCK
  assert attention.pallas_block(512, 512) == attention.PALLAS_BLOCK   # no mesh: the CPU's


@pytest.mark.slow
def test_pallas_blocks_are_the_cost_models_choice(tmp_path):
  """scripts/pallas_blocks.py compiles the kernel per generation and block size and exits 1
  when `PALLAS_BLOCKS` is not its choice."""
  script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "pallas_blocks.py"
  result = subprocess.run([sys.executable, str(script), "--output", str(tmp_path / "b.md")],
                          capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "(chosen)" in (tmp_path / "b.md").read_text()


def test_libtpu_counts_a_loop_body_once_and_the_cycles_say_how_often_it_runs():
  """The premise of `StepReport.loop_expansion`: libtpu's cost analysis of a scan of n
  matmuls is the same for every n (its loop body counted once), while its per-kernel
  cycle estimates times the trip count grow n-fold. If libtpu starts multiplying loop
  bodies itself, this fails (and the report would count them twice)."""
  devices = targets.compile_devices(targets.parse_target("v5e:2x2"))
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  spec, named = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
  x = jax.ShapeDtypeStruct((4096, 2048), jax.numpy.bfloat16, sharding=named(mesh, spec("x")))
  seen = []
  for n in (4, 16):
    w = jax.ShapeDtypeStruct((n, 2048, 2048), jax.numpy.bfloat16, sharding=named(mesh, spec()))

    def scan(x, w):
      return jax.lax.scan(lambda c, wi: (jax.numpy.tanh(c @ wi), None), x, w)[0]

    compiled = jax.jit(scan).lower(x, w).compile()
    stats = hlo_stats.hlo_stats(compiled.as_text())
    cost = compiled.cost_analysis()
    seen.append((cost["flops"], cost["optimal_seconds"]))
    assert stats.loop_expansion == pytest.approx(n, rel=0.05)
  assert seen[0] == seen[1]

"""Mesh construction, rule presets, and sharded training equal to unsharded.

The multi-device part runs `tests/sharding_worker.py` in a subprocess with 8
forced CPU devices (XLA_FLAGS must be set before JAX starts).
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5xlike import partitioning

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape, devices, expected", [
    ({"data": -1}, 8, {"data": 8, "fsdp": 1, "tensor": 1}),
    ({"data": 2, "fsdp": -1, "tensor": 2}, 8, {"data": 2, "fsdp": 2, "tensor": 2}),
    (None, 4, {"data": 4, "fsdp": 1, "tensor": 1}),
    ({"tensor": 1}, 1, {"data": 1, "fsdp": 1, "tensor": 1}),
])
def test_resolve_mesh_shape(shape, devices, expected):
  assert partitioning.resolve_mesh_shape(shape, devices) == expected


@pytest.mark.parametrize("shape, message", [
    ({"model": 2}, "unknown axes"), ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": 3}, "needs 3 devices"), ({"data": 0}, "positive"),
    ({"data": 3, "fsdp": -1}, "divisible"),
])
def test_bad_mesh_shapes(shape, message):
  with pytest.raises(ValueError, match=message):
    partitioning.resolve_mesh_shape(shape, 8)


def test_rule_presets():
  import flax.linen as nn
  rules = partitioning.logical_axis_rules("data_fsdp_tensor")
  assert tuple(nn.logical_to_mesh_axes(("embed", "mlp"), rules)) == ("fsdp", "tensor")
  assert tuple(nn.logical_to_mesh_axes(("batch", "length", "embed"), rules)) == (
      ("data", "fsdp"), None, None)  # fsdp is taken by batch: embed stays whole
  assert tuple(nn.logical_to_mesh_axes(("embed", "mlp"),
                                       partitioning.logical_axis_rules("fsdp"))) == ("fsdp", None)
  with pytest.raises(ValueError, match="unknown logical axis rules preset"):
    partitioning.logical_axis_rules("zero")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("sharding") / "runs.npz")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, str(REPO / "tests" / "sharding_worker.py"), out],
                          env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  with open(out + ".json") as f:
    summary = json.load(f)
  return summary, np.load(out)


@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "d2f2t2"])
def test_sharded_training_equals_single_device(sharded_runs, mesh):
  summary, arrays = sharded_runs
  np.testing.assert_allclose(summary[mesh]["losses"], summary["single"]["losses"], rtol=1e-5)
  names = [k.split("|", 1)[1] for k in arrays.files if k.startswith("single|")]
  assert len(names) > 50
  for name in names:
    ref, got = arrays[f"single|{name}"], arrays[f"{mesh}|{name}"]
    diff = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)
    assert diff <= 1e-5, (name, diff)


def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say(sharded_runs):
  summary, _ = sharded_runs
  specs = {mesh: summary[mesh]["specs"] for mesh in summary}
  assert specs["data8"]["encoder/layers_0/mlp/wi_0/kernel"] == [None, None]
  assert specs["fsdp8"]["encoder/layers_0/mlp/wi_0/kernel"] == ["fsdp", None]
  assert specs["fsdp8"]["token_embedder/embedding"] == [None, "fsdp"]
  assert specs["d2f2t2"]["encoder/layers_0/mlp/wi_0/kernel"] == ["fsdp", "tensor"]
  assert specs["d2f2t2"]["decoder/logits_dense/kernel"] == ["fsdp", "tensor"]
  assert specs["d2f2t2"]["encoder/layers_0/attention/out/kernel"] == ["tensor", "fsdp"]
  assert summary["data8"]["opt_sharded"] == 0
  assert summary["fsdp8"]["opt_sharded"] > 20  # ZeRO-3: moments sharded like parameters
  assert summary["d2f2t2"]["opt_sharded"] > summary["fsdp8"]["opt_sharded"]


def test_dcn_mesh_counts_slices_or_hosts():
  """Devices of one slice index are grouped by process (GPU hosts): one process here is one
  granule, so DCN_MESH_SHAPE asking for two is refused, and one is the plain mesh."""
  with pytest.raises(ValueError, match=r"needs 2 slices \(hosts\) of devices; these devices "
                                       r"form 1"):
    partitioning.make_mesh({"data": 1}, dcn_mesh_shape={"data": 2})
  mesh = partitioning.make_mesh({"data": -1}, dcn_mesh_shape={"data": 1})
  assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1, "tensor": 1}


def test_cluster_environment_detection(monkeypatch):
  from t5xlike.cli import distributed
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  assert distributed.cluster_environment() is None
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.cluster_environment() == "SLURM"
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1,t2")
  assert distributed.cluster_environment() == "Cloud TPU"

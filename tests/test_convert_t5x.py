"""`python -m t5xlike.convert --from=t5x`: T5X checkpoints (msgpack, orbax) written here in
T5X's layouts (`tests/t5x_checkpoints.py`) from random small `transformers` T5 models, imported
bit for bit, exported to Hugging Face, scored by `infer`; unreadable ones refused in one line."""
import pathlib

import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5xlike.interop import output_dir, param_trees

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests import hf_reference, t5x_checkpoints, test_convert  # noqa: E402  (torch, transformers)
from tests.test_convert import (  # noqa: E402
  _T5_ROWS,
  _convert,
  _hf_t5_logits,
  _hf_t5_scores,
  _score_with_infer,
  load_hf,
)


@pytest.fixture(scope="module")
def t5_v11(tmp_path_factory):
  return test_convert._import(tmp_path_factory, "t5_v11", hf_reference.t5_model(v1_1=True),
                              test_convert._t5_batch())


@pytest.fixture(scope="module")
def t5_v10(tmp_path_factory):
  return test_convert._import(tmp_path_factory, "t5_v10", hf_reference.t5_model(v1_1=False),
                              test_convert._t5_batch())


def _t5x_import(source: pathlib.Path, out: pathlib.Path, *flags) -> dict:
  assert _convert("--from=t5x", f"--checkpoint={source}", f"--output={out}",
                  "--relative_attention_max_distance=16", *flags) == 0
  import gin

  from t5xlike.cli import gin_config
  gin_config.configure([str(out / "model.gin")])
  cfg = output_dir.configured_model().network.config
  gin.clear_config()
  return cfg, output_dir.read_params(out / "checkpoint", cfg)


@pytest.mark.parametrize("scanned, gcs", [(False, False), (True, False), (False, True)])
def test_t5x_msgpack_checkpoint_import_is_exact(t5_v11, tmp_path, scanned, gcs):
  saved = t5x_checkpoints.write_t5x_msgpack(tmp_path / "checkpoint_100", t5_v11.flat, scanned,
                            bfloat16=("token_embedder/embedding", "mlp/wi_0/kernel"), gcs=gcs)
  cfg, params = _t5x_import(tmp_path / "checkpoint_100", tmp_path / "ours")
  assert cfg == t5_v11.model.network.config.__class__(
      **{**t5_v11.model.network.config.__dict__, "scan_layers": scanned})
  assert sorted(params) == sorted(saved)
  for key, value in saved.items():
    np.testing.assert_array_equal(params[key], value, err_msg=key)


@pytest.fixture(scope="module")
def t5x_orbax(t5_v11, tmp_path_factory):
  """T5X's default checkpoint of the T5.1.1 weights, float32 and bfloat16 saves."""
  root = tmp_path_factory.mktemp("t5x_orbax")
  return {dtype: t5x_checkpoints.write_t5x_orbax(root / str(dtype), t5_v11.flat, 600, dtype)
          for dtype in (None, "bfloat16")}


def test_t5x_orbax_fixture_has_t5x_default_layout(t5x_orbax):
  step_dir = t5x_orbax[None]
  assert step_dir.name == "checkpoint_600" and (step_dir / "_CHECKPOINT_METADATA").is_file()
  assert {p.name for p in step_dir.iterdir() if p.is_dir()} == {"state", "dataset"}
  assert (step_dir / "state" / "manifest.ocdbt").is_file()  # OCDBT
  assert not (step_dir / "_METADATA").exists()  # No PyTree in the step directory itself.


@pytest.mark.parametrize("save_dtype, item", [(None, ""), ("bfloat16", ""), (None, "state")])
def test_t5x_orbax_default_checkpoint_import_is_exact(t5_v11, t5x_orbax, tmp_path,
                                                      save_dtype, item):
  """T5X's default step directory (or its `state` item) imports with the parameters as
  written (a bfloat16 save: the bfloat16 values); the optimizer state is not read."""
  import ml_dtypes
  cfg, params = _t5x_import(t5x_orbax[save_dtype] / item, tmp_path / "ours")
  assert cfg == t5_v11.model.network.config
  assert sorted(params) == sorted(t5_v11.flat)
  for key, value in t5_v11.flat.items():
    if save_dtype:
      value = value.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(params[key], value, err_msg=key)


def test_t5x_orbax_pytree_in_the_step_directory_imports(t5_v10, tmp_path):
  """A PyTree checkpoint of the train state written into the step directory itself
  (no CheckpointManager items), per-array (no OCDBT)."""
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer:
    checkpointer.save(tmp_path / "checkpoint_7", args=ocp.args.PyTreeSave({
        "target": param_trees.unflatten(t5_v10.flat), "state": {"step": np.asarray(7)}}))
  cfg, params = _t5x_import(tmp_path / "checkpoint_7", tmp_path / "ours",
                            "--mlp_activation=relu")
  assert cfg == t5_v10.model.network.config
  for key, value in t5_v10.flat.items():
    np.testing.assert_array_equal(params[key], value, err_msg=key)


def test_t5x_to_hf_matches_the_original_transformers_model(t5_v11, tmp_path, capfd):
  t5x_checkpoints.write_t5x_msgpack(tmp_path / "checkpoint_100", t5_v11.flat, scanned=True)
  assert _convert("--from=t5x", "--to=hf", f"--checkpoint={tmp_path / 'checkpoint_100'}",
                  f"--output={tmp_path / 'hf'}", "--relative_attention_max_distance=16") == 0
  loaded, info, _ = load_hf(type(t5_v11.hf_model), tmp_path / "hf", capfd)
  assert not (info["missing_keys"] or info["unexpected_keys"])
  np.testing.assert_allclose(_hf_t5_logits(loaded, t5_v11.batch),
                             _hf_t5_logits(t5_v11.hf_model, t5_v11.batch), atol=1e-6, rtol=0)


def test_t5x_shape_mismatch_is_one_line_error_naming_the_path(t5_v11, tmp_path, capsys):
  flat = dict(t5_v11.flat)
  flat["encoder/layers_1/mlp/wo/kernel"] = flat["encoder/layers_1/mlp/wo/kernel"][:-1]
  t5x_checkpoints.write_t5x_msgpack(tmp_path / "checkpoint_1", flat, scanned=False)
  code = _convert("--from=t5x", f"--checkpoint={tmp_path / 'checkpoint_1'}",
                  f"--output={tmp_path / 'ours'}")
  err = capsys.readouterr().err.strip()
  assert code == 2 and "encoder/layers_1/mlp/wo/kernel: got (63, 32)" in err
  assert len(err.splitlines()) == 1 and not (tmp_path / "ours").exists()
  assert not list(tmp_path.glob(".ours*"))



def test_t5x_orbax_default_checkpoint_to_infer_score_equals_transformers(t5_v11, t5x_orbax,
                                                                        tmp_path):
  """T5X's default orbax checkpoint, converted, scored by `python -m t5xlike.infer`."""
  assert _convert("--from=t5x", f"--checkpoint={t5x_orbax[None]}",
                  f"--output={tmp_path / 'from_orbax'}",
                  "--relative_attention_max_distance=16") == 0
  np.testing.assert_allclose(
      _score_with_infer(tmp_path / "from_orbax", _T5_ROWS, tmp_path,
                        "{'inputs': 10, 'targets': 8}"),
      _hf_t5_scores(t5_v11.hf_model, _T5_ROWS), atol=1e-4, rtol=0)


def _t5x_step_without_state(step_dir: pathlib.Path, flat) -> None:
  """A CheckpointManager step of T5X's with the `dataset` item only."""
  with ocp.CheckpointManager(step_dir.parent, options=ocp.CheckpointManagerOptions(
      step_prefix="checkpoint"),
      item_handlers={"dataset": t5x_checkpoints.T5XDatasetHandler()}) as manager:
    manager.save(3, args=ocp.args.Composite(dataset=t5x_checkpoints.T5XDatasetArgs()))


def _t5x_state_without_target(step_dir: pathlib.Path, flat) -> None:
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=True)) as checkpointer:
    checkpointer.save(step_dir / "state", args=ocp.args.PyTreeSave(
        {"state": {"step": np.asarray(3)}, "params_ema": {"x": np.ones(2, np.float32)}}))


def _t5x_state_damaged(step_dir: pathlib.Path, flat) -> None:
  t5x_checkpoints.write_t5x_orbax(step_dir.parent, flat, 3)
  for data in (step_dir / "state").rglob("d/*"):
    data.write_bytes(b"damaged")


def _t5x_msgpack_garbage(step_dir: pathlib.Path, flat) -> None:
  step_dir.mkdir(parents=True)
  (step_dir / "checkpoint").write_bytes(b"\xc1 not msgpack")


def _t5x_msgpack_without_target(step_dir: pathlib.Path, flat) -> None:
  from flax import serialization
  step_dir.mkdir(parents=True)
  (step_dir / "checkpoint").write_bytes(serialization.msgpack_serialize(
      {"version": 3, "optimizer": {"state": {"step": np.asarray(3)}}}))


def _t5x_per_layer_relpos(step_dir: pathlib.Path, flat) -> None:
  """T5X's scalable_t5 network unscanned: a relative position table in every layer."""
  flat = dict(flat)
  table = flat.pop("encoder/relpos_bias/rel_embedding")
  for i in range(2):
    flat[f"encoder/layers_{i}/relpos_bias/rel_embedding"] = table
  t5x_checkpoints.write_t5x_msgpack(step_dir, flat, scanned=False)


@pytest.mark.parametrize("build, message", [
    (_t5x_step_without_state, "not a T5X checkpoint step directory: expected T5X's orbax"),
    (_t5x_state_without_target, "holds no 'target' (T5X's parameters; found: params_ema, "
                                "state)"),
    (_t5x_state_damaged, "checkpoint_3/state: unreadable orbax"),
    (_t5x_msgpack_garbage, "not a T5X msgpack checkpoint"),
    (_t5x_msgpack_without_target, "has no 'target' (the parameters)"),
    (_t5x_per_layer_relpos, "encoder/layers_0/relpos_bias/rel_embedding: a relative position "
                            "table per layer (T5X's scalable_t5 network) is not supported"),
])
def test_unreadable_t5x_checkpoint_is_one_line_exit_2_nothing_written(t5_v11, tmp_path, capsys,
                                                                    build, message):
  build(tmp_path / "run" / "checkpoint_3", t5_v11.flat)
  capsys.readouterr()
  assert _convert("--from=t5x", f"--checkpoint={tmp_path / 'run' / 'checkpoint_3'}",
                  f"--output={tmp_path / 'out'}") == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

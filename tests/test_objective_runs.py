"""Every `gin_configs/objectives/*.gin` trains from the command line; inspect_data rows.

Each config runs 2 steps at tiny lengths (one compilation each); the falling
loss of the full-length runs is measured in docs/objectives.md.
"""
import json
import pathlib

import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5xlike import inspect_data, train

SHORT = {
    "span_corruption": "{'inputs': 64, 'targets': 16}",
    "ul2": "{'inputs': 64, 'targets': 64}",
    "ul2_decoder": "{'inputs': 48, 'targets': 48}",
    "causal_lm": "{'targets': 32}",
    "prefix_lm": "{'inputs': 24, 'targets': 24}",
    "noncausal_mlm": "{'inputs': 24, 'targets': 8}",
    "mlm": "{'inputs': 32}",
    "electra": "{'inputs': 32}",
    "spdf_sparse": "{'targets': 32}",
}
OBJECTIVE_KEYS = {
    "electra": ("generator_loss", "generator_accuracy", "discriminator_loss",
                "discriminator_accuracy", "replaced_fraction"),
    "spdf_sparse": ("dense_train_flops", "sparse_train_flops"),
}


def gin_args(name, model_dir, *extra):
  return [f"--gin_file=gin_configs/objectives/{name}.gin", f"--gin.MODEL_DIR={model_dir}",
          f"--gin.TASK_FEATURE_LENGTHS={SHORT.get(name, SHORT['spdf_sparse'])}",
          "--gin.BATCH_SIZE=4", "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=2",
          "--gin.EVAL_STEPS=1", "--gin.CHECKPOINT_PERIOD=2", *extra]


def rows(model_dir, kind="train"):
  path = pathlib.Path(model_dir) / "metrics" / f"{kind}.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def params_of(step_dir):
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(pathlib.Path(step_dir) / "state")["params"]


def test_every_objective_config_is_covered():
  shipped = {p.stem for p in pathlib.Path("gin_configs/objectives").glob("[!_]*.gin")}
  # The configs that start from a checkpoint run in test_spdf's chain and test_adaptation;
  # mosaicbert's run (and its errors) in test_mosaicbert.
  assert shipped == set(SHORT) | {"spdf_dense_finetune", "lm_adaptation",
                                  "noncausal_mlm_adaptation", "mosaicbert"}


# One config per model family in the default run (encoder-decoder, decoder-only,
# encoder-only); the others (~20 s each, their objectives unit-tested in process) -m slow.
DEFAULT_RUN = ("span_corruption", "causal_lm", "mlm")


@pytest.mark.parametrize("name", [name if name in DEFAULT_RUN else
                                  pytest.param(name, marks=pytest.mark.slow)
                                  for name in sorted(SHORT)])
def test_objective_trains(name, tmp_path):
  """4 steps: every step logged, the held-out loss falls (the same batch at steps 2 and
  4; the training batches differ, so their losses need not), the objective's own fields
  are logged."""
  assert train.main(gin_args(name, tmp_path, "--gin.TRAIN_STEPS=4")) == 0
  train_rows = rows(tmp_path)
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train_rows)
  for key in OBJECTIVE_KEYS.get(name, ()):
    assert all(isinstance(r[key], float) for r in train_rows), key
  eval_rows = rows(tmp_path, "eval")
  assert [r["step"] for r in eval_rows] == [2, 4] and np.isfinite(eval_rows[0]["loss"])
  assert eval_rows[1]["loss"] < eval_rows[0]["loss"], eval_rows
  assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_2", "checkpoint_4"]
  if name == "electra":
    assert 0.0 < train_rows[0]["replaced_fraction"] <= round(0.15 * 32) / 32  # ≤ masked share
    exported = params_of(tmp_path / "discriminator" / "checkpoint_4")
    assert "generator" not in json.dumps(list(exported))
  if name == "spdf_sparse":
    assert 0 < train_rows[0]["sparse_train_flops"] < train_rows[0]["dense_train_flops"]


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = np.asarray(value)
  return out


def test_spdf_dense_finetuning_revives_the_zeros(tmp_path):
  sparse_dir, dense_dir = tmp_path / "sparse", tmp_path / "dense"
  assert train.main(gin_args("spdf_sparse", sparse_dir, "--gin.TRAIN_STEPS=2")) == 0
  sparse = _flat(params_of(sparse_dir / "checkpoint_2"))
  masked = {k: v == 0.0 for k, v in sparse.items() if k.endswith("kernel") and
            ("attention" in k or "mlp" in k)}
  assert masked and all(m.mean() == pytest.approx(0.75, abs=1e-3) for m in masked.values())
  assert train.main(gin_args("spdf_dense_finetune", dense_dir, "--gin.TRAIN_STEPS=4",
                             f"--gin.INITIAL_CHECKPOINT_PATH={sparse_dir / 'checkpoint_2'}")) == 0
  assert [r["step"] for r in rows(dense_dir)] == [3, 4]
  dense = _flat(params_of(dense_dir / "checkpoint_4"))
  for name, mask in masked.items():
    assert np.mean(dense[name][mask] != 0.0) > 0.9, name


def test_dense_finetuning_needs_a_checkpoint(tmp_path, capsys):
  assert train.main(gin_args("spdf_dense_finetune", tmp_path / "run")) == 2
  assert "INITIAL_CHECKPOINT_PATH" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def _json_rows(capsys, name, num):
  assert inspect_data.main([f"--gin_file=gin_configs/objectives/{name}.gin", "--json",
                            f"--num_examples={num}"]) == 0
  return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_inspect_data_ul2_rows(capsys):
  found = _json_rows(capsys, "ul2", 700)
  assert [r["name"] for r in found] == ["R_mu3_r0.15", "R_mu8_r0.15", "X_mu3_r0.5",
                                        "X_mu8_r0.5", "X_mu64_r0.15", "X_mu64_r0.5",
                                        "S_prefix_lm"]
  assert sum(r["examples"] for r in found) == 700
  for row in found:
    for key in ("noise_density", "mean_noise_span_length", "mean_inputs_length",
                "mean_targets_length"):
      assert isinstance(row[key], float), (row["name"], key)
    assert row["mean_inputs_length"] <= 128 and row["mean_targets_length"] <= 128


def test_inspect_data_electra_mask_rate(capsys):
  (row,) = _json_rows(capsys, "electra", 200)
  # The released masking: 19 draws with replacement on 128 tokens hit 1 - (1 - 1/128)^19
  # of the positions (13.8%, not 15%).
  assert row["name"] == "electra"
  assert row["mask_rate"] == pytest.approx(1 - (1 - 1 / 128) ** 19, abs=0.005)


def test_inspect_data_shows_paradigm_tokens_and_prefix(capsys):
  assert inspect_data.main(["--gin_file=gin_configs/objectives/ul2_decoder.gin",
                            "--num_examples=6"]) == 0
  out = capsys.readouterr().out
  assert "decoder features" in out
  assert any(p in out for p in ("[NLU]", "[NLG]", "[S2S]"))

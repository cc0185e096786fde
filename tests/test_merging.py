"""Merging (finetuning/merging.py) and `python -m t5xlike.merge` (finetuning/merge_run.py)."""
import json

import numpy as np
import pytest
from flax import traverse_util

from t5xlike import checkpoints, merge
from t5xlike.finetuning import merging
from t5xlike.runs import merge_run
from tests import test_finetuning_selection as tfs

SHAPES = {"encoder/layers/mlp/wi/kernel": (3, 8, 5),  # scanned: 3 layers
          "encoder/layers_0/attention/query/kernel": (6, 7),
          "decoder/final_layer_norm/scale": (9,)}


def params(seed, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def save(path, step, flat):
  return checkpoints.save_params(path, step, traverse_util.unflatten_dict(
      {tuple(k.split("/")): v for k, v in flat.items()}))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """{name: (step dir, flat params)}: a base and three fine-tuned checkpoints."""
  root = tmp_path_factory.mktemp("merge")
  out = {}
  for i, name in enumerate(["base", "a", "b", "c"]):
    flat = params(i)
    out[name] = (save(root / name, 10 + i, flat), flat)
  return out


def run(*flags):
  return merge.main(list(flags))


# -- the math ----------------------------------------------------------------------
def test_uniform_soup_of_copies_is_the_checkpoint_bit_for_bit(ckpts, tmp_path):
  path, flat = ckpts["a"]
  assert run("--method=uniform", f"--checkpoints={path},{path},{path}",
             f"--output={tmp_path}") == 0
  out = tfs.load(tmp_path / "checkpoint_11")
  assert all(out[k].tobytes() == flat[k].tobytes() for k in flat)
  report = json.loads((tmp_path / "merge.json").read_text())
  assert report["method"] == "uniform" and report["step"] == 11


def test_uniform_soup_and_task_arithmetic_match_numpy(ckpts, tmp_path):
  base, a, b = (ckpts[n][1] for n in ("base", "a", "b"))
  assert run("--method=task_arithmetic", f"--base={ckpts['base'][0]}",
             f"--checkpoints={ckpts['a'][0]},{ckpts['b'][0]}", "--lambdas=0.3,-0.7",
             f"--output={tmp_path / 'ta'}") == 0
  out = tfs.load(tmp_path / "ta" / "checkpoint_12")
  for k in base:
    b64 = base[k].astype(np.float64)
    ref = (b64 + 0.3 * (a[k] - b64) + -0.7 * (b[k] - b64)).astype(np.float32)
    assert out[k].tobytes() == ref.tobytes()
    soup = merging.uniform_soup([a[k], b[k]])
    assert soup.tobytes() == ((a[k].astype(np.float64) + b[k]) / 2).astype(np.float32).tobytes()


@pytest.mark.parametrize("layered", [False, True])
def test_breadcrumbs_masks_exactly_the_requested_counts(layered):
  rng = np.random.default_rng(0)
  tau = rng.standard_normal((3, 40)).astype(np.float32)
  tau[1, :10] = 0.5  # ties
  beta, gamma = 0.1, 0.45
  keep = merging.breadcrumbs_mask(tau, beta, gamma, layered=layered)
  layers = [(tau[i], keep[i]) for i in range(3)] if layered else [(tau.ravel(), keep.ravel())]
  for values, kept in layers:
    n = values.size
    assert (~kept).sum() == round(beta * n) + round(gamma * n)
    magnitude = np.abs(values)
    order = np.argsort(magnitude, kind="stable")  # reference ranking, ties by index
    bottom, top = order[:round(gamma * n)], order[n - round(beta * n):]
    assert not kept[bottom].any() and not kept[top].any()
    assert kept.sum() == n - len(bottom) - len(top)
    assert magnitude[kept].max() <= magnitude[top].min()
    assert magnitude[kept].min() >= magnitude[bottom].max()


def test_breadcrumbs_ties_are_deterministic_by_index():
  keep = merging.breadcrumbs_mask(np.full(10, 2.0), beta=0.2, gamma=0.3)
  assert keep.tolist() == [False] * 3 + [True] * 5 + [False] * 2


def test_breadcrumbs_cli_matches_numpy_per_layer(ckpts, tmp_path):
  base, a, b = (ckpts[n][1] for n in ("base", "a", "b"))
  assert run("--method=breadcrumbs", f"--base={ckpts['base'][0]}",
             f"--checkpoints={ckpts['a'][0]},{ckpts['b'][0]}", "--beta=0.1", "--gamma=0.5",
             "--lam=0.8", f"--output={tmp_path}") == 0
  out = tfs.load(tmp_path / "checkpoint_12")
  for k in base:
    b64 = base[k].astype(np.float64)
    total = np.zeros_like(b64)
    for theta in (a[k], b[k]):
      tau = theta - b64
      # Per layer along the scanned axis, per tensor otherwise.
      rows = tau.reshape(tau.shape[0], -1) if "/layers/" in k else tau.reshape(1, -1)
      masked = np.zeros_like(rows)
      for i, row in enumerate(rows):
        order = np.argsort(np.abs(row), kind="stable")
        n = row.size
        kept = order[round(0.5 * n):n - round(0.1 * n)]
        masked[i, kept] = row[kept]
      total += masked.reshape(tau.shape)
    assert out[k].tobytes() == (b64 + 0.8 * total).astype(np.float32).tobytes(), k


def test_greedy_soup_ranks_then_adds_while_not_worse():
  """Ingredients are numbers; a soup's score is -(mean - 1)^2 (higher is better)."""
  value = {"w": 3.0, "x": 1.5, "y": 0.8, "z": -4.0}
  score = lambda members: -(np.mean([value[m] for m in members]) - 1.0) ** 2
  members, log = merging.greedy_soup(list(value), lambda n: score([n]), score)
  # Ranked alone: y (-0.04), x (-0.25), w (-4), z (-25). {y, x}: mean 1.15 -> -0.0225,
  # added; {y, x, w}: mean 1.77 -> -0.59, skipped; {y, x, z}: mean -0.57 -> -2.4, skipped.
  assert [row["name"] for row in log] == ["y", "x", "w", "z"]
  assert members == ["y", "x"]
  assert [row["added"] for row in log] == [True, True, False, False]
  lower, _ = merging.greedy_soup(list(value), lambda n: -score([n]), lambda m: -score(m),
                                 higher_is_better=False)
  assert lower == members


def test_greedy_cli_uses_the_evaluator(ckpts, tmp_path):
  """merge_run.merge with an evaluator that prefers parameters near checkpoint a."""
  target = ckpts["a"][1]

  class Closeness:
    """Minus the squared distance to checkpoint a's parameters."""
    higher_is_better = True

    def __call__(self, flat):
      return -float(sum(np.sum((flat[k] - target[k]) ** 2) for k in flat))
  evaluator = Closeness()
  paths = [str(ckpts[n][0]) for n in ("b", "a", "c")]
  merge_run.merge(method="greedy", checkpoint_paths=paths, output=str(tmp_path),
                  evaluator=evaluator)
  report = json.loads((tmp_path / "merge.json").read_text())
  assert report["members"][0] == paths[1]
  out = tfs.load(tmp_path / "checkpoint_13")
  by_path = {str(ckpts[n][0]): ckpts[n][1] for n in ("a", "b", "c")}
  expected = {k: merging.uniform_soup([by_path[m][k] for m in report["members"]])
              for k in target}
  assert all(out[k].tobytes() == expected[k].tobytes() for k in target)
  assert [row["added"] for row in report["decisions"]][0] is True


# -- one-line errors, nothing written ------------------------------------------------
def test_errors_are_one_line_and_write_nothing(ckpts, tmp_path, capsys):
  other = dict(ckpts["a"][1])
  other["encoder/layers_0/attention/query/kernel"] = np.zeros((6, 8), np.float32)
  wrong_shape = save(tmp_path / "wrong_shape", 5, other)
  fewer = {k: v for k, v in ckpts["a"][1].items() if "final_layer_norm" not in k}
  missing_param = save(tmp_path / "missing_param", 5, fewer)
  a = ckpts["a"][0]
  cases = [
      ([f"--checkpoints={a},{wrong_shape}"], "encoder/layers_0/attention/query/kernel has shape "
       "(6, 8)"),
      ([f"--checkpoints={a},{missing_param}"], "decoder/final_layer_norm/scale is in"),
      ([f"--checkpoints={a},{tmp_path / 'nope'}"], "nope does not exist"),
      ([f"--checkpoints={a},{tmp_path}"], "is not a t5xlike checkpoint step directory"),
      (["--method=task_arithmetic", f"--checkpoints={a}"], "needs --base"),
      (["--method=task_arithmetic", f"--base={a}", f"--checkpoints={a},{a}", "--lambdas=1,2,3"],
       "--lambdas"),
      (["--method=breadcrumbs", f"--base={a}", f"--checkpoints={a}", "--beta=0.6",
        "--gamma=0.6"], "drop more than"),
      (["--method=add_deltas", f"--base={a}", f"--deltas={tmp_path}"], "is not a sparse delta"),
      (["--method=greedy", f"--checkpoints={a}"], "needs a held-out metric"),
      (["--method=soup", f"--checkpoints={a}"], "--method='soup'"),
  ]
  for flags, message in cases:
    out = tmp_path / "out"
    if not any(f.startswith("--method") for f in flags):
      flags = ["--method=uniform"] + flags
    assert run(*flags, f"--output={out}") == 2, flags
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, (flags, err)
    assert not out.exists()
  # An existing output step is refused too.
  assert run("--method=uniform", f"--checkpoints={a}", f"--output={tmp_path / 'twice'}") == 0
  assert run("--method=uniform", f"--checkpoints={a}", f"--output={tmp_path / 'twice'}") == 2
  assert "exists already" in capsys.readouterr().err


@pytest.mark.slow
def test_greedy_soup_from_the_command_line_with_the_eval_machinery(tmp_path):
  """runs/greedy_soup.gin: the held-out metric is InferenceEvaluator's loss; the best
  ingredient alone (the first in the report) has the lowest loss, and the soup's
  members were each accepted with a loss no higher than before."""
  paths = [str(save(tmp_path / f"t{i}", 2, tfs.flat(tfs.tiny_params()) if i == 0 else {
      k: v + np.float32(0.05 * i) * np.random.default_rng(i).standard_normal(v.shape)
      .astype(np.float32) for k, v in tfs.flat(tfs.tiny_params()).items()})) for i in range(3)]
  out = tmp_path / "greedy"
  assert run("--gin_file=gin_configs/models/t5_1_1/tiny.gin",
             "--gin_file=gin_configs/runs/greedy_soup.gin", "--method=greedy",
             f"--checkpoints={','.join(paths)}", f"--output={out}",
             "--gin.MIXTURE_OR_TASK_NAME='mt_first_word'", "--gin.EVAL_MAX_EXAMPLES=8",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
             "--gin.BATCH_SIZE=8") == 0
  report = json.loads((out / "merge.json").read_text())
  alone = [row["alone"] for row in report["decisions"]]
  assert alone == sorted(alone)  # lower loss first
  best = alone[0]
  for row in report["decisions"][1:]:
    assert row["added"] == (row["soup_with"] <= best)
    best = row["soup_with"] if row["added"] else best
  assert (out / "checkpoint_2" / "state").exists()

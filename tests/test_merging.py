"""Merging (finetuning/merging.py) and `python -m t5xlike.merge` (runs/merge_run.py):
soups and task arithmetic against NumPy float64; Model Breadcrumbs against ports of the
official code (per row) and of mergekit (per tensor); the greedy soup's strict
acceptance and its held-out examples."""
import json

import numpy as np
import pytest
from flax import traverse_util

from t5xlike import checkpoints, errors, merge
from t5xlike.finetuning import merging
from t5xlike.inference import task_evaluator
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


def official_middle_keep(tensor, top_k_keep, top_k_remove):
  """A NumPy port of rezazzr/breadcrumbs `src/task_vectors.py` `TaskVectorMiddleKeep`
  (remove_first=True): along the last axis drop the int(n * top_k_remove) largest |tau|
  (`mask_remove_top`), then keep the int(n * top_k_keep) largest of the rest
  (`mask_keep_top`); `torch.topk` is `argsort` of -|tau| here (no ties in the tests)."""
  n = tensor.shape[-1]
  keep = np.ones(tensor.shape)
  np.put_along_axis(keep, np.argsort(-np.abs(tensor), axis=-1)[..., :int(n * top_k_remove)],
                    0.0, axis=-1)
  removed = keep * tensor
  kept = np.zeros(tensor.shape)
  np.put_along_axis(kept, np.argsort(-np.abs(removed), axis=-1)[..., :int(n * top_k_keep)],
                    1.0, axis=-1)
  return kept * keep > 0


def mergekit_magnitude_outliers(tensor, density, gamma):
  """mergekit's `magnitude_outliers` mask (per tensor): drop int(gamma * n) largest, keep
  int(density * n), the smallest rest dropped."""
  n = tensor.size
  target, n_top = int(density * n), int(gamma * n)
  n_bot = n - target - n_top
  order = np.argsort(np.abs(tensor).reshape(-1), kind="stable")
  keep = np.zeros(n, bool)
  keep[order[n_bot:n - n_top]] = True
  return keep.reshape(tensor.shape)


@pytest.mark.parametrize("shape,keep,remove", [((6, 7), 0.5, 0.15), ((3, 4, 10), 0.3, 0.1),
                                               ((9,), 0.4, 0.2)])
def test_breadcrumbs_rows_follow_the_official_code(shape, keep, remove):
  """Per row (last axis) with floored counts: beta = the official top_k_remove, gamma =
  1 - top_k_keep - top_k_remove. (Rows of 7 at beta 0.15, gamma 0.35: the official code
  keeps int(3.5) = 3, rounding half to even would keep 4.)"""
  tau = np.random.default_rng(sum(shape)).standard_normal(shape)
  got = merging.breadcrumbs_mask(tau, beta=remove, gamma=1.0 - keep - remove)
  assert (got == official_middle_keep(tau, keep, remove)).all()
  # A scanned leaf's rows are the rows of its layers: the same mask stacked or not.
  if len(shape) == 3:
    assert (got == np.stack([merging.breadcrumbs_mask(t, remove, 1.0 - keep - remove)
                             for t in tau])).all()


@pytest.mark.parametrize("layered", [False, True])
def test_breadcrumbs_per_tensor_follows_mergekit(layered):
  rng = np.random.default_rng(0)
  tau = rng.standard_normal((3, 40)).astype(np.float32)
  beta, gamma = 0.1, 0.45
  keep = merging.breadcrumbs_mask(tau, beta, gamma, granularity="tensor", layered=layered)
  units = [(tau[i], keep[i]) for i in range(3)] if layered else [(tau, keep)]
  for values, kept in units:
    assert (kept == mergekit_magnitude_outliers(values, 1.0 - beta - gamma, beta)).all()
    assert (~kept).sum() == int(beta * values.size) + (
        values.size - int(beta * values.size) - int((1 - beta - gamma) * values.size + 1e-9))


def test_breadcrumbs_ties_are_deterministic_by_index():
  keep = merging.breadcrumbs_mask(np.full(10, 2.0), beta=0.2, gamma=0.3)
  assert keep.tolist() == [False] * 3 + [True] * 5 + [False] * 2
  tied = np.array([[1.0, 0.5, 0.5, 0.5, 2.0]])  # ties within a row: lower index lower
  assert merging.breadcrumbs_mask(tied, beta=0.2, gamma=0.4).tolist() == [
      [True, False, False, True, False]]


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_breadcrumbs_cli_matches_numpy(ckpts, tmp_path, granularity):
  """The command (per row by default; per tensor, and per layer of a scanned leaf,
  through the gin binding `merge_run.merge.breadcrumbs_granularity`)."""
  base, a, b = (ckpts[n][1] for n in ("base", "a", "b"))
  flags = ["--method=breadcrumbs", f"--base={ckpts['base'][0]}",
           f"--checkpoints={ckpts['a'][0]},{ckpts['b'][0]}", "--beta=0.1", "--gamma=0.5",
           "--lam=0.8", f"--output={tmp_path}"]
  if granularity == "row":
    assert run(*flags) == 0
  else:
    merge_run.merge(method="breadcrumbs", checkpoint_paths=[str(ckpts[n][0]) for n in "ab"],
                    output=str(tmp_path), base=str(ckpts["base"][0]), beta=0.1, gamma=0.5,
                    lam=0.8, breadcrumbs_granularity="tensor")
  out = tfs.load(tmp_path / "checkpoint_12")
  assert json.loads((tmp_path / "merge.json").read_text())["granularity"] == granularity
  for k in base:
    b64 = base[k].astype(np.float64)
    total = np.zeros_like(b64)
    for theta in (a[k], b[k]):
      tau = theta - b64
      if granularity == "row":
        kept = official_middle_keep(tau, 0.4, 0.1)
      elif "/layers/" in k:  # a scanned leaf: per layer
        kept = np.stack([mergekit_magnitude_outliers(t, 0.4, 0.1) for t in tau])
      else:
        kept = mergekit_magnitude_outliers(tau, 0.4, 0.1)
      total += np.where(kept, tau, 0.0)
    assert out[k].tobytes() == (b64 + 0.8 * total).astype(np.float32).tobytes(), k


def test_greedy_soup_ranks_then_adds_while_strictly_better():
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


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_greedy_soup_skips_an_ingredient_that_ties(higher_is_better):
  """The reference adds only on `held_out_val_accuracy > best_val_acc_so_far`: a soup
  that scores exactly as well does not take the ingredient."""
  sign = 1.0 if higher_is_better else -1.0
  alone = {"a": 0.9, "b": 0.8, "c": 0.7}
  soups = {("a", "b"): 0.9, ("a", "c"): 0.95}  # b ties the best so far, c improves
  members, log = merging.greedy_soup(list(alone), lambda n: sign * alone[n],
                                     lambda m: sign * soups[tuple(m)], higher_is_better)
  assert members == ["a", "c"]
  assert [row["added"] for row in log] == [True, False, True]


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
    assert row["added"] == (row["soup_with"] < best)
    best = row["soup_with"] if row["added"] else best
  assert (out / "checkpoint_2" / "state").exists()


def test_held_out_metric_selects_on_examples_after_first_example():
  """The greedy soup's held-out part: examples [first_example, first_example + n) of each
  task's split, i.e. not the first ones that `runs/eval.gin` reports on."""
  lengths = {"inputs": 16, "targets": 8}
  task = dict(mixture_or_task_name="mt_first_word",
              mixture_or_task_module="t5xlike.tasks.multitask")
  whole = task_evaluator.InferenceEvaluator(feature_lengths=lengths, max_examples=None, **task)
  (_, examples, rows), = whole.tasks
  assert len(examples) == 300
  held_out = merge_run.HeldOutMetric(None, task_feature_lengths=lengths, first_example=256,
                                     max_examples=None, **task)
  (_, got, got_rows), = held_out.evaluator.tasks
  assert got_rows == rows[256:] and len(got) == 44
  assert all(all(np.array_equal(g[k], e[k]) for k in e) for g, e in zip(got, examples[256:]))
  few = merge_run.HeldOutMetric(None, task_feature_lengths=lengths, first_example=10,
                                max_examples=5, **task)
  assert few.evaluator.tasks[0][2] == rows[10:15]
  with pytest.raises(errors.ConfigError, match="no example after the first 300"):
    merge_run.HeldOutMetric(None, task_feature_lengths=lengths, first_example=300,
                            max_examples=None, **task)

"""Replication: model soups (Wortsman et al. 2022) and Model Breadcrumbs vs task arithmetic.

    python scripts/replicate/soups.py --output_dir=/tmp/replicate/soups [--fast]

Claims (docs/replications.md):
  soups   Wortsman et al. 2022, section 3 / Figure 1 and Table 3: from one pretrained
          model, fine-tunes of a hyperparameter sweep averaged: the greedy soup beats
          the best single fine-tune on held-out data, the uniform soup beats their mean
          (and, in their Table 3, can fall below the best one).
  merging Davari & Belilovsky 2023 (Model Breadcrumbs), section 4: masking each task
          vector's largest and smallest entries before adding them to the base merges
          tasks better than task arithmetic (Ilharco et al. 2023).

Protocol (fixed before the runs, once per seed, nothing tuned on the reported data):
  1. base      the quickstart (`gin_configs/quickstart.gin`: T5.1.1 tiny, span
               corruption on the embedded corpus, 400 steps).
  2. sweep     runs/finetune.gin from the base on `multitask_offline` for STEPS
               steps: learning rate 5e-4 / 1e-3 / 2e-3 x RANDOM_SEED 0 / 1 (data
               order, dropout): six ingredients.
  3. soups     `python -m t5xlike.merge --method=uniform` of the six, and
               `--method=greedy` (runs/greedy_soup.gin: held-out loss on validation
               examples 256-299 of each task, ingredients ranked by it, an addition
               kept only when it strictly lowers it).
  4. merging   two single-task fine-tunes from the base (mt_first_word, mt_count_words,
               lr 1e-3, seed 0), merged by task arithmetic and by Model Breadcrumbs
               (the paper's setting: the largest 0.7 % and the smallest 85 % of each row
               of |tau| dropped: `--beta=0.007 --gamma=0.85`), lambda 0.5 and 1.
  5. reported  `python -m t5xlike.eval` (runs/eval.gin) of every model on validation
               examples 0-255 of the five `multitask_offline` tasks: teacher-forced
               loss per target token (mean over tasks) and each task's headline
               metric (accuracy, sequence accuracy or ROUGE-1; mean over tasks).

Writes OUT/results.json, OUT/soups.png and OUT/rows.md (the rows of
docs/replications.md). `--fast` runs the same pipeline at a toy size (a 40-step
base, 2 ingredients of 10 steps, 16 examples per task): it checks the mechanics,
not the finding.
"""
from __future__ import annotations

import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import protocol

MODEL = "gin_configs/models/t5_1_1/tiny.gin"
FINETUNE = [MODEL, "gin_configs/runs/finetune.gin"]
EVAL = [MODEL, "gin_configs/runs/eval.gin"]
TASK_A, TASK_B = "mt_first_word", "mt_count_words"


def sizes(fast: bool) -> dict:
  if fast:
    return {"base_steps": 40, "steps": 10, "lrs": (1e-3,), "seeds": (0, 1), "examples": 16,
            "lambdas": (1.0,)}
  return {"base_steps": 400, "steps": 200, "lrs": (5e-4, 1e-3, 2e-3), "seeds": (0, 1),
          "examples": 256, "lambdas": (0.5, 1.0)}


def run(out_dir: str, fast: bool, base_checkpoint: str | None = None) -> dict:
  size = sizes(fast)
  ingredients = [(lr, seed) for lr in size["lrs"] for seed in size["seeds"]]
  merges = [(m, lam) for m in ("task_arithmetic", "breadcrumbs") for lam in size["lambdas"]]
  total = (0 if base_checkpoint else 1) + len(ingredients) * 2 + 2 + 2 + 2 + len(merges) * 2 + 3
  runs = protocol.Runs(out_dir, total=total)
  eval_bindings = {"EVAL_MAX_EXAMPLES": size["examples"],
                   "MIXTURE_OR_TASK_NAME": "multitask_offline"}

  base = protocol.quickstart_base(runs, size["base_steps"], base_checkpoint)
  end = size["base_steps"] + size["steps"]

  def finetune(name, lr, seed, task="multitask_offline"):
    directory = runs.train(name, FINETUNE, {
        "INITIAL_CHECKPOINT_PATH": str(base), "TRAIN_STEPS": end, "LEARNING_RATE": lr,
        "RANDOM_SEED": seed, "MIXTURE_OR_TASK_NAME": task, "EVAL_PERIOD": None,
        "CHECKPOINT_PERIOD": end, "LOG_PERIOD": 10})
    return protocol.last_checkpoint(directory)

  def evaluate(name, checkpoint):
    return protocol.task_summary(runs.evaluate(f"eval_{name}", EVAL, checkpoint, eval_bindings))

  results: dict = {"sizes": size, "ingredients": [], "soups": {}, "merging": {}}
  checkpoints = []
  for lr, seed in ingredients:
    name = f"ft_lr{lr:g}_seed{seed}"
    checkpoint = finetune(name, lr, seed)
    checkpoints.append(checkpoint)
    results["ingredients"].append({"name": name, "lr": lr, "seed": seed,
                                   **evaluate(name, checkpoint)})
  listed = ",".join(str(c) for c in checkpoints)
  uniform = runs.merge("soup_uniform", ["--method=uniform", f"--checkpoints={listed}"])
  greedy = runs.merge("soup_greedy", ["--method=greedy", f"--checkpoints={listed}"],
                      gin_files=[MODEL, "gin_configs/runs/greedy_soup.gin"])
  for name, directory in (("uniform", uniform), ("greedy", greedy)):
    results["soups"][name] = evaluate(f"soup_{name}", protocol.last_checkpoint(directory))
  report = protocol.read_json(greedy / "merge.json")
  results["soups"]["greedy"].update(members=report["members"], decisions=report["decisions"])

  singles = {task: finetune(f"single_{task}", 1e-3, 0, task) for task in (TASK_A, TASK_B)}
  pair = (TASK_A, TASK_B)
  for task, checkpoint in singles.items():
    directory = runs.evaluate(f"eval_single_{task}", EVAL, checkpoint, eval_bindings)
    results["merging"][f"only {task}"] = protocol.task_summary(directory, pair)
  results["merging"]["base"] = protocol.task_summary(
      runs.evaluate("eval_base", EVAL, base, eval_bindings), pair)
  both = ",".join(str(singles[t]) for t in pair)
  for method, lam in merges:
    flags = [f"--method={method}", f"--base={base}", f"--checkpoints={both}"]
    flags += [f"--lambdas={lam}"] if method == "task_arithmetic" else [
        "--beta=0.007", "--gamma=0.85", f"--lam={lam}"]
    name = f"{method}_lam{lam:g}"
    merged = protocol.last_checkpoint(runs.merge(name, flags))
    results["merging"][f"{method} λ={lam:g}"] = protocol.task_summary(
        runs.evaluate(f"eval_{name}", EVAL, merged, eval_bindings), pair)
  findings(results)
  protocol.finish(out_dir, "soups", results, figure(results), rows(results))
  return results


def findings(results: dict) -> None:
  """The comparisons the claims make, added to `results` (lower loss is better)."""
  losses = [r["loss"] for r in results["ingredients"]]
  soups = results["soups"]
  results["findings"] = {
      "best_single_loss": min(losses), "mean_single_loss": statistics.mean(losses),
      "greedy_beats_best": soups["greedy"]["loss"] < min(losses),
      "greedy_equals_best": soups["greedy"]["loss"] == min(losses),
      "uniform_beats_mean": soups["uniform"]["loss"] < statistics.mean(losses),
      "uniform_beats_best": soups["uniform"]["loss"] < min(losses)}
  merging = results["merging"]
  for key in list(merging):
    if key.startswith("breadcrumbs"):
      twin = key.replace("breadcrumbs", "task_arithmetic")
      results["findings"][f"{key} beats {twin}"] = merging[key]["loss"] < merging[twin]["loss"]


def rows(results: dict) -> str:
  f, soups = results["findings"], results["soups"]
  kept = soups["greedy"]["members"]
  greedy = ("agrees" if f["greedy_beats_best"] else "ties" if f["greedy_equals_best"]
            else "does not agree")
  uniform = "agrees" if f["uniform_beats_mean"] else "does not agree"
  soup_row = (
      f"| Model soups (Wortsman et al. 2022, §3, Fig. 1, Table 3): greedy soup > best single "
      f"fine-tune; uniform soup > mean | held-out loss: best single {f['best_single_loss']:.3f}, "
      f"mean {f['mean_single_loss']:.3f}, uniform soup {soups['uniform']['loss']:.3f}, greedy "
      f"soup {soups['greedy']['loss']:.3f} ({len(kept)} of {len(results['ingredients'])} "
      f"ingredients kept) | greedy: {greedy}; uniform > mean: {uniform} |")
  merging = results["merging"]
  parts = [f"{k} {v['loss']:.3f}" for k, v in merging.items()]
  verdicts = [k for k, v in f.items() if " beats " in k]
  agree = sum(bool(f[k]) for k in verdicts)
  merge_row = (f"| Model Breadcrumbs vs task arithmetic (Davari & Belilovsky 2023, §4): "
               f"masked task vectors merge better | mean loss on {TASK_A} + {TASK_B}: "
               f"{'; '.join(parts)} | {agree} of {len(verdicts)} λ agree |")
  return soup_row + "\n" + merge_row


def figure(results: dict):
  plt = protocol.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  for seed, marker in ((0, "o"), (1, "s")):
    points = [r for r in results["ingredients"] if r["seed"] == seed]
    left.plot([r["lr"] for r in points], [r["loss"] for r in points], marker, ls="",
              label=f"fine-tune, seed {seed}")
  for name, style in (("uniform", "--"), ("greedy", "-")):
    left.axhline(results["soups"][name]["loss"], ls=style, color="k" if name == "greedy"
                 else "gray", label=f"{name} soup")
  left.set_xscale("log")
  left.set_xlabel("fine-tuning learning rate")
  left.set_ylabel("held-out loss per target token (mean of 5 tasks)")
  left.set_title("Soups of a learning-rate x seed sweep")
  left.legend(fontsize=8)
  names = list(results["merging"])
  for offset, task in ((-0.2, TASK_A), (0.2, TASK_B)):
    right.bar([i + offset for i in range(len(names))],
              [results["merging"][n]["tasks"][task]["loss"] for n in names], width=0.4,
              label=task)
  right.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
  right.set_ylabel("held-out loss per target token")
  right.set_title("Merging two single-task fine-tunes")
  right.legend(fontsize=8)
  return fig


def main(argv=None) -> int:
  return protocol.main(argv, __doc__, run, shares_base=True)


if __name__ == "__main__":
  sys.exit(main())

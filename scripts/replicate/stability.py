"""Replication: fine-tuning stability on a small training set (Tinn et al. 2023).

    python scripts/replicate/stability.py --output_dir=/tmp/replicate/stability [--fast] \
        [--base_checkpoint=ELECTRA_DIR/discriminator/checkpoint_400]

Claim (docs/replications.md): Tinn et al. 2023 ("Fine-tuning large neural language
models for biomedical natural language processing", Patterns 4(4)), sections 3-4:
with few training examples, fine-tuning is unstable across random seeds; layer-wise
learning-rate decay, re-initialising the top layer and freezing the lower layers
each reduce that variance (and raise the mean).

Protocol (fixed before the runs, once per seed):
  1. base       ELECTRA Tiny's discriminator after `objectives/electra.gin` for 400
                steps, seed 0 (or --base_checkpoint: such a discriminator's
                checkpoint_400, e.g. OUT/electra of the ELECTRA replication).
  2. fine-tune  `finetune/electra_classifier.gin` (AdamW, lr 1e-3 constant, dropout
                0.1, fresh classifier head from RANDOM_SEED) on `cls_word_order_300`
                (the first 300 training sentences of cls_word_order) for STEPS steps
                (~21 epochs), with each technique's gin ahead of it:
                  standard  none
                  llrd      finetune/llrd.gin (decay 0.8 per layer from the top)
                  reinit    finetune/reinit_top.gin (the top encoder layer re-drawn)
                  freeze    finetune/freeze_lower.gin (the lower layer and the
                            embeddings frozen)
                RANDOM_SEED 0-4 each (head, dropout, data order, re-initialisation).
  3. reported   validation accuracy on the 512 held-out sentences at the end; per
                technique the mean and the standard deviation over the seeds.

Writes OUT/results.json, OUT/stability.png, OUT/rows.md. `--fast`: a 10-step base,
10 fine-tuning steps, 2 seeds (the mechanics only).
"""
from __future__ import annotations

import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import protocol

CLASSIFIER = "gin_configs/finetune/electra_classifier.gin"
TECHNIQUES = {"standard": [], "llrd": ["gin_configs/finetune/llrd.gin"],
              "reinit": ["gin_configs/finetune/reinit_top.gin"],
              "freeze": ["gin_configs/finetune/freeze_lower.gin"]}
TASK = "cls_word_order_300"


def sizes(fast: bool) -> dict:
  if fast:
    return {"base_steps": 10, "steps": 10, "seeds": (0, 1)}
  return {"base_steps": 400, "steps": 200, "seeds": (0, 1, 2, 3, 4)}


def electra_base(runs: protocol.Runs, steps: int, checkpoint: str | None) -> pathlib.Path:
  """The discriminator to fine-tune: ELECTRA pretrained in OUT/base, or `checkpoint`."""
  if checkpoint is None:
    model_dir = runs.train("base", ["gin_configs/objectives/electra.gin"], {
        "TRAIN_STEPS": steps, "RANDOM_SEED": 0, "EVAL_PERIOD": None, "CHECKPOINT_PERIOD": steps,
        "optim.cosine.decay_steps": steps})
    return protocol.last_checkpoint(model_dir / "discriminator")
  path = pathlib.Path(checkpoint).resolve()
  if not path.is_dir() or path.name != f"checkpoint_{steps}" or path.parent.name != (
      "discriminator"):
    raise SystemExit(f"replicate: --base_checkpoint {checkpoint} is not an ELECTRA run's "
                     f"discriminator/checkpoint_{steps}")
  return path


def run(out_dir: str, fast: bool, base_checkpoint: str | None = None) -> dict:
  size = sizes(fast)
  runs = protocol.Runs(out_dir, total=(0 if base_checkpoint else 1)
                       + len(TECHNIQUES) * len(size["seeds"]))
  base = electra_base(runs, size["base_steps"], base_checkpoint)
  end = size["base_steps"] + size["steps"]
  results: dict = {"sizes": size, "runs": []}
  for technique, gins in TECHNIQUES.items():
    for seed in size["seeds"]:
      directory = runs.train(f"{technique}_seed{seed}", [*gins, CLASSIFIER], {
          "INITIAL_CHECKPOINT_PATH": str(base), "MIXTURE_OR_TASK_NAME": TASK,
          "TRAIN_STEPS": end, "RANDOM_SEED": seed, "EVAL_PERIOD": end,
          "CHECKPOINT_PERIOD": end, "LOG_PERIOD": 1 if fast else 25})
      row = protocol.eval_rows(directory)[TASK]
      results["runs"].append({"technique": technique, "seed": seed,
                              "accuracy": row["accuracy"]})
  results["stats"] = {
      technique: {"mean": statistics.mean(accs), "std": statistics.stdev(accs),
                  "min": min(accs), "max": max(accs)}
      for technique, accs in protocol.grouped(results["runs"], "technique", "accuracy").items()}
  standard = results["stats"]["standard"]
  results["findings"] = {
      f"{t}_lowers_std": results["stats"][t]["std"] < standard["std"] for t in TECHNIQUES
      if t != "standard"} | {
      f"{t}_raises_mean": results["stats"][t]["mean"] > standard["mean"] for t in TECHNIQUES
      if t != "standard"}
  protocol.finish(out_dir, "stability", results, figure(results), rows(results))
  return results


def rows(results: dict) -> str:
  s, f = results["stats"], results["findings"]
  cells = [f"{t} {100 * v['mean']:.1f} ± {100 * v['std']:.1f} (min {100 * v['min']:.1f})"
           for t, v in s.items()]
  techniques = [t for t in TECHNIQUES if t != "standard"]
  steadier = [t for t in techniques if f[f"{t}_lowers_std"]]
  verdict = ("agrees" if len(steadier) == len(techniques) else
             "does not agree" if not steadier else "agrees in part")
  return (f"| Fine-tuning stability on small data (Tinn et al. 2023, §3-4): LLRD, top-layer "
          f"re-initialisation and freezing lower layers reduce the spread across seeds | "
          f"{TASK} accuracy %, mean ± std over {len(results['sizes']['seeds'])} seeds: "
          f"{'; '.join(cells)} | {verdict} (lower spread: {', '.join(steadier) or 'none'}) |")


def figure(results: dict):
  plt = protocol.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  by_technique = protocol.grouped(results["runs"], "technique", lambda r: 100 * r["accuracy"])
  for i, technique in enumerate(TECHNIQUES):
    accs = by_technique[technique]
    ax.plot([i] * len(accs), accs, "o", color=f"C{i}", alpha=0.7)
    ax.errorbar(i + 0.15, statistics.mean(accs), yerr=statistics.stdev(accs), fmt="s",
                color=f"C{i}", capsize=4)
  ax.set_xticks(range(len(TECHNIQUES)), list(TECHNIQUES))
  ax.set_ylabel(f"{TASK} validation accuracy (%)")
  ax.set_title("Fine-tuning on 300 examples: seeds (dots), mean ± std")
  return fig


def main(argv=None) -> int:
  return protocol.main(argv, __doc__, run, shares_base=True)


if __name__ == "__main__":
  sys.exit(main())

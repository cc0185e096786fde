"""Replication: forgetting under sequential fine-tuning, full vs HFT vs LoRA (Hui et al. 2024).

    python scripts/replicate/forgetting.py --output_dir=/tmp/replicate/forgetting [--fast]

Claim (docs/replications.md): HFT (Hui et al. 2024, "HFT: Half Fine-Tuning for
Large Language Models", section 4, continual learning): updating a random half of
the parameters and freezing the other half keeps more of what the model could do
before than full fine-tuning, at a similar fit of the new task.

Protocol (fixed before the runs, once per seed):
  1. base   the quickstart (`gin_configs/quickstart.gin`, 400 steps).
  2. task A runs/finetune.gin from the base on TASK_A (`mt_fill_blank`: name the word
            a blank replaced) for STEPS steps, lr 1e-3, seed 0.
  3. task B from A's checkpoint, STEPS steps on TASK_B (`mt_count_words`: answer a
            digit) with full fine-tuning (runs/finetune.gin, lr 1e-3), HFT
            (finetune/hft.gin: half of the parameter tensors frozen, drawn by
            HFT_SEED = the run's seed, lr 1e-3) and LoRA (finetune/lora.gin: rank 8 on
            q and v, its own lr 1e-2), RANDOM_SEED 0 and 1.
  4. reported `python -m t5xlike.eval` (runs/eval.gin) of A's checkpoint and of every
            B run on validation examples 0-255 of both tasks: the teacher-forced loss
            per target token and the task's accuracy. Forgetting = A's loss after B
            minus A's loss before B (A's checkpoint).

Writes OUT/results.json, OUT/forgetting.png, OUT/rows.md. `--fast`: a 40-step base,
10 steps per task, one seed, 16 examples (the mechanics only).
"""
from __future__ import annotations

import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import protocol

MODEL = "gin_configs/models/t5_1_1/tiny.gin"
EVAL = [MODEL, "gin_configs/runs/eval.gin"]
TASK_A, TASK_B = "mt_fill_blank", "mt_count_words"
METHODS = {"full": "gin_configs/runs/finetune.gin", "hft": "gin_configs/finetune/hft.gin",
           "lora": "gin_configs/finetune/lora.gin"}


def sizes(fast: bool) -> dict:
  if fast:
    return {"base_steps": 40, "steps": 10, "seeds": (0,), "examples": 16}
  return {"base_steps": 400, "steps": 300, "seeds": (0, 1), "examples": 256}


def task_figures(eval_dir: pathlib.Path) -> dict:
  rows = protocol.eval_rows(eval_dir)
  return {task: {"loss": rows[task]["loss"], "accuracy": rows[task].get("accuracy")}
          for task in (TASK_A, TASK_B)}


def run(out_dir: str, fast: bool, base_checkpoint: str | None = None) -> dict:
  size = sizes(fast)
  total = (1 if base_checkpoint else 2) + 2 + len(METHODS) * len(size["seeds"]) * 2
  runs = protocol.Runs(out_dir, total=total)
  eval_bindings = {"EVAL_MAX_EXAMPLES": size["examples"],
                   "MIXTURE_OR_TASK_NAME": "multitask_offline"}
  base = protocol.quickstart_base(runs, size["base_steps"], base_checkpoint)
  after_a = size["base_steps"] + size["steps"]
  after_b = after_a + size["steps"]

  def finetune(name, gin, start, end, task, seed, extra=None):
    bindings = {"INITIAL_CHECKPOINT_PATH": str(start), "TRAIN_STEPS": end,
                "MIXTURE_OR_TASK_NAME": task, "RANDOM_SEED": seed, "EVAL_PERIOD": None,
                "CHECKPOINT_PERIOD": end, "LOG_PERIOD": 10, **(extra or {})}
    return runs.train(name, [MODEL, gin], bindings)

  a_dir = finetune("task_a", METHODS["full"], base, after_a, TASK_A, 0)
  a_checkpoint = protocol.last_checkpoint(a_dir)
  results: dict = {"sizes": size, "before": task_figures(
      runs.evaluate("eval_task_a", EVAL, a_checkpoint, eval_bindings)), "runs": []}
  results["base"] = task_figures(runs.evaluate("eval_base", EVAL, base, eval_bindings))
  for method, gin in METHODS.items():
    for seed in size["seeds"]:
      name = f"b_{method}_seed{seed}"
      extra = {"HFT_SEED": seed} if method == "hft" else {}
      directory = finetune(name, gin, a_checkpoint, after_b, TASK_B, seed, extra)
      checkpoint = protocol.last_checkpoint(directory / "peft" if method == "lora"
                                            else directory)
      figures = task_figures(runs.evaluate(f"eval_{name}", EVAL, checkpoint, eval_bindings))
      results["runs"].append({"method": method, "seed": seed, **figures,
                              "forgetting": figures[TASK_A]["loss"]
                              - results["before"][TASK_A]["loss"]})
  results["means"] = {
      method: {key: statistics.mean(r[key] if key == "forgetting" else r[TASK_B]["loss"]
                                    for r in results["runs"] if r["method"] == method)
               for key in ("forgetting", "b_loss")}
      for method in METHODS}
  means = results["means"]
  results["findings"] = {"hft_forgets_less_than_full":
                         means["hft"]["forgetting"] < means["full"]["forgetting"],
                         "lora_forgets_less_than_full":
                         means["lora"]["forgetting"] < means["full"]["forgetting"]}
  protocol.finish(out_dir, "forgetting", results, figure(results), rows(results))
  return results


def rows(results: dict) -> str:
  m, f = results["means"], results["findings"]
  before = results["before"][TASK_A]["loss"]
  ours = "; ".join(f"{method}: {v['forgetting']:+.3f} on A, B loss {v['b_loss']:.3f}"
                   for method, v in m.items())
  return (f"| HFT (Hui et al. 2024, §4): freezing half of the parameters forgets less of an "
          f"earlier task than full fine-tuning | {TASK_A} loss {before:.3f} before {TASK_B}; "
          f"change after it (mean of {len(results['sizes']['seeds'])} seeds): {ours} | "
          f"{'agrees' if f['hft_forgets_less_than_full'] else 'does not agree'} (LoRA "
          f"{'forgets less' if f['lora_forgets_less_than_full'] else 'forgets more'} than full) |")


def figure(results: dict):
  plt = protocol.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  colors = {"full": "C0", "hft": "C1", "lora": "C2"}
  for r in results["runs"]:
    ax.plot(r[TASK_B]["loss"], r[TASK_A]["loss"], "o", color=colors[r["method"]],
            label=r["method"] if r["seed"] == results["sizes"]["seeds"][0] else None)
  before = results["before"]
  ax.plot(before[TASK_B]["loss"], before[TASK_A]["loss"], "k*", ms=12,
          label="after task A (before B)")
  ax.set_xlabel(f"{TASK_B} held-out loss (new task; lower = learned)")
  ax.set_ylabel(f"{TASK_A} held-out loss (old task; higher = forgotten)")
  ax.set_title("Sequential fine-tuning: A, then B")
  ax.legend(fontsize=8)
  return fig


def main(argv=None) -> int:
  return protocol.main(argv, __doc__, run, shares_base=True)


if __name__ == "__main__":
  sys.exit(main())

"""Replication: UL2's mixture of denoisers vs span corruption vs causal LM (Tay et al. 2022).

    python scripts/replicate/ul2_vs_sc_vs_clm.py --output_dir=/tmp/replicate/ul2 [--fast]

Claim (docs/replications.md): Tay et al. 2022 ("UL2: Unifying Language Learning
Paradigms"), section 4, Tables 3-4: with the architecture fixed, the mixture of
denoisers is the best objective across fine-tuning and prompted (few-shot) use,
where span corruption (T5) is good at the first and causal LM (GPT) at the second.

Protocol (fixed before the runs, once per seed):
  1. pretraining  the same T5.1.1 tiny encoder-decoder on the embedded corpus through
                  `objectives/ul2.gin` (32 rows of 128 input + 128 target positions
                  per step, PRETRAIN_STEPS = 250 steps, its inverse-square-root
                  schedule; 250 keeps the command within ~20 minutes here: each
                  pretraining step is 0.8-1.0 s),
                  with three denoiser tables:
                    ul2  the shipped 7-denoiser mixture, paradigm tokens as text;
                    sc   one denoiser: T5's span corruption (r 0.15, mean span 3), no
                         paradigm token;
                    clm  one denoiser: a prefix LM cut after the chunk's first token
                         (`prefix_split='fixed'`, r 0.99): the decoder predicts the
                         chunk left to right from one token of context, the causal LM
                         an encoder-decoder can be trained on.
                  The same steps and rows: the same token positions per step; the
                  corpus tokens each row covers differ by denoiser (reported).
  2. fine-tuning  runs/finetune.gin from each on `multitask_offline` (five tasks) for
                  FINETUNE_STEPS steps, lr 1e-3; UL2 with its mode token `[S2S]` on
                  every example (UL2 §3.1.3, mode switching), the others none.
  3. reported     `python -m t5xlike.eval` on validation examples 0-255 of the six
                  `multitask_offline_all` tasks (UL2 again with `[S2S]`):
                  (a) fine-tuned: the five trained tasks' mean teacher-forced loss per
                      target token and mean headline metric;
                  (b) prompted: the pretrained model, no fine-tuning, on all six tasks'
                      instructions (mean loss), and the fine-tuned model on the held-out
                      task `mt_last_word` (zero-shot).

Writes OUT/results.json, OUT/ul2_vs_sc_vs_clm.png, OUT/rows.md. `--fast`: 10 pretraining
and 10 fine-tuning steps, 16 examples per task (the mechanics only).
"""
from __future__ import annotations

import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import protocol

MODEL = "gin_configs/models/t5_1_1/tiny.gin"
PRETRAIN = ["gin_configs/objectives/ul2.gin"]
FINETUNE = [MODEL, "gin_configs/runs/finetune.gin"]
EVAL = [MODEL, "gin_configs/runs/eval.gin"]
HELD_OUT = "mt_last_word"
#: The denoiser table of each objective (None: ul2.gin's mixture) and its mode token.
OBJECTIVES: dict[str, tuple[list[dict] | None, str | None]] = {
    "ul2": (None, "[S2S]"),
    "sc": ([{"name": "SC_mu3_r0.15", "paradigm": "", "mean_noise_span_length": 3.0,
             "noise_density": 0.15}], None),
    "clm": ([{"name": "CLM", "paradigm": "", "mean_noise_span_length": None,
              "noise_density": 0.99, "prefix_split": "fixed"}], None),
}


def sizes(fast: bool) -> dict:
  if fast:
    return {"pretrain_steps": 10, "finetune_steps": 10, "seeds": (0,), "examples": 16}
  return {"pretrain_steps": 250, "finetune_steps": 300, "seeds": (0,), "examples": 256}


def run(out_dir: str, fast: bool) -> dict:
  size = sizes(fast)
  runs = protocol.Runs(out_dir, total=len(OBJECTIVES) * len(size["seeds"]) * 4)
  steps, end = size["pretrain_steps"], size["pretrain_steps"] + size["finetune_steps"]
  results: dict = {"sizes": size, "runs": []}
  for seed in size["seeds"]:
    for name, (denoisers, mode) in OBJECTIVES.items():
      bindings = {"TRAIN_STEPS": steps, "RANDOM_SEED": seed, "EVAL_PERIOD": None,
                  "CHECKPOINT_PERIOD": steps, "LOG_PERIOD": 1 if fast else 25}
      if denoisers is not None:
        bindings["ul2.UL2.denoisers"] = denoisers
      pretrained = protocol.last_checkpoint(runs.train(f"pretrain_{name}_seed{seed}",
                                                       PRETRAIN, bindings))
      tuned = protocol.last_checkpoint(runs.train(f"finetune_{name}_seed{seed}", FINETUNE, {
          "INITIAL_CHECKPOINT_PATH": str(pretrained), "TRAIN_STEPS": end, "RANDOM_SEED": seed,
          "LEARNING_RATE": 1e-3, "MODE_TOKEN": mode, "EVAL_PERIOD": None,
          "CHECKPOINT_PERIOD": end, "LOG_PERIOD": 1 if fast else 25}))
      eval_bindings = {"EVAL_MAX_EXAMPLES": size["examples"], "MODE_TOKEN": mode,
                       "MIXTURE_OR_TASK_NAME": "multitask_offline_all"}
      prompted = protocol.task_summary(runs.evaluate(f"eval_pretrained_{name}_seed{seed}",
                                                     EVAL, pretrained, eval_bindings))
      tuned_dir = runs.evaluate(f"eval_finetuned_{name}_seed{seed}", EVAL, tuned, eval_bindings)
      trained_tasks = [t for t in protocol.task_summary(tuned_dir)["tasks"] if t != HELD_OUT]
      results["runs"].append({
          "objective": name, "seed": seed, "prompted": prompted,
          "finetuned": protocol.task_summary(tuned_dir, trained_tasks),
          "held_out": protocol.task_summary(tuned_dir, [HELD_OUT])})
  by_objective = protocol.grouped(results["runs"], "objective", lambda r: r)
  results["means"] = {name: {key: statistics.mean(r[key]["loss"] for r in by_objective[name])
                             for key in ("finetuned", "prompted", "held_out")}
                      for name in OBJECTIVES}
  best = {key: min(OBJECTIVES, key=lambda n: results["means"][n][key])
          for key in ("finetuned", "prompted", "held_out")}
  results["findings"] = {f"best_{key}": name for key, name in best.items()}
  results["findings"]["ul2_best_in_all"] = all(name == "ul2" for name in best.values())
  protocol.finish(out_dir, "ul2_vs_sc_vs_clm", results, figure(results), rows(results))
  return results


def rows(results: dict) -> str:
  cells = []
  for name in OBJECTIVES:
    run = next(r for r in results["runs"] if r["objective"] == name)
    metric = run["finetuned"]["metric"]
    cells.append(f"{name}: fine-tuned {results['means'][name]['finetuned']:.3f}"
                 f"{f' (mean task metric {metric:.1f})' if metric is not None else ''}, prompted "
                 f"{results['means'][name]['prompted']:.3f}, held-out "
                 f"{results['means'][name]['held_out']:.3f}")
  f = results["findings"]
  verdict = ("agrees" if f["ul2_best_in_all"] else
             f"does not agree (best: fine-tuned {f['best_finetuned']}, prompted "
             f"{f['best_prompted']}, held-out {f['best_held_out']})")
  return (f"| UL2 vs span corruption vs causal LM (Tay et al. 2022, §4, Tables 3-4): the "
          f"mixture is best fine-tuned and prompted | held-out loss per target token "
          f"(seeds {', '.join(str(s) for s in results['sizes']['seeds'])}): "
          f"{'; '.join(cells)} | {verdict} |")


def figure(results: dict):
  plt = protocol.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  keys = (("finetuned", "fine-tuned (5 tasks)"), ("held_out", f"zero-shot {HELD_OUT}"),
          ("prompted", "pretrained, prompted (6 tasks)"))
  width = 0.26
  for i, name in enumerate(OBJECTIVES):
    ax.bar([k + (i - 1) * width for k in range(len(keys))],
           [results["means"][name][key] for key, _ in keys], width=width, label=name)
  ax.set_xticks(range(len(keys)), [label for _, label in keys])
  ax.set_ylabel("held-out loss per target token (lower is better)")
  ax.set_title("T5.1.1 tiny pretrained with each objective, same steps")
  ax.legend(fontsize=8)
  return fig


def main(argv=None) -> int:
  return protocol.main(argv, __doc__, run)


if __name__ == "__main__":
  sys.exit(main())

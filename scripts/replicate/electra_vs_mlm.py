"""Replication: ELECTRA's replaced-token detection vs masked LM at equal pretraining FLOPs.

    python scripts/replicate/electra_vs_mlm.py --output_dir=/tmp/replicate/electra [--fast]

Claim (docs/replications.md): Clark et al. 2020 (ELECTRA), section 3.2 / Table 1 and
Figure 3: at the same pretraining compute, a discriminator trained by replaced-token
detection fine-tunes better than a masked-LM model of the same size, most clearly
for small models.

Protocol (fixed before the runs, once per seed):
  1. ELECTRA `gin_configs/objectives/electra.gin` (ELECTRA Tiny: discriminator 2 x 64,
             generator 16 wide, embedded corpus, 32 rows of 128 tokens, AdamW with
             cosine decay) for PRETRAIN_STEPS steps, seed 0; its FLOPs per step are
             read from its train.jsonl (`t5xlike.flops`, generator included).
  2. MLM     `objectives/mlm.gin` + `objectives/_encoder_adamw.gin` (the same
             encoder as the discriminator, the same optimizer and data), seed 0, for
             as many steps as give the same pretraining FLOPs (its FLOPs per step read
             from a one-step probe run), cosine decay over its own length.
  3. fine-tune `finetune/electra_classifier.gin` from each (ELECTRA: the exported
             discriminator; MLM: the encoder of its checkpoint; the MLM head is not
             restored) and from random parameters, on `cls_word_order` (is a sentence
             in its original word order?) for FINETUNE_STEPS steps, lr 1e-3,
             RANDOM_SEED 0-4 (head, dropout, data order).
  4. reported validation accuracy on the 512 held-out sentences (majority class
             50.6 %) at the end of fine-tuning: per start the five seeds, their mean
             and median (the paper reports the median of fine-tuning runs from one
             pretraining). One pretraining per objective keeps the command within
             ~18 minutes here (the two pretrainings take 7 of them).

Writes OUT/results.json, OUT/electra_vs_mlm.png, OUT/rows.md. `--fast`: 10 pretraining
steps, 10 fine-tuning steps, two fine-tuning seeds (the mechanics only).
"""
from __future__ import annotations

import json
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import protocol

ELECTRA = ["gin_configs/objectives/electra.gin"]
MLM = ["gin_configs/objectives/mlm.gin", "gin_configs/objectives/_encoder_adamw.gin"]
CLASSIFIER = ["gin_configs/finetune/electra_classifier.gin"]


def sizes(fast: bool) -> dict:
  if fast:
    return {"pretrain_steps": 10, "finetune_steps": 10, "seeds": (0, 1)}
  return {"pretrain_steps": 400, "finetune_steps": 300, "seeds": (0, 1, 2, 3, 4)}


def flops_per_step(model_dir: pathlib.Path) -> float:
  """Model FLOPs of one training step, from the first row of the run's train.jsonl
  (`tflops_per_device` x `step_time_s`, one device)."""
  row = json.loads((model_dir / "metrics" / "train.jsonl").read_text().splitlines()[0])
  return row["tflops_per_device"] * 1e12 * row["step_time_s"]


def run(out_dir: str, fast: bool) -> dict:
  size = sizes(fast)
  seeds, steps = size["seeds"], size["pretrain_steps"]
  runs = protocol.Runs(out_dir, total=3 + 3 * len(seeds))
  common = {"EVAL_PERIOD": None, "LOG_PERIOD": 1 if fast else 25, "RANDOM_SEED": 0}
  probe = runs.train("probe_mlm", MLM, {**common, "TRAIN_STEPS": 1})
  electra_dir = runs.train("electra", ELECTRA, {
      **common, "TRAIN_STEPS": steps, "CHECKPOINT_PERIOD": steps,
      "optim.cosine.decay_steps": steps})
  electra_flops, mlm_flops = flops_per_step(electra_dir), flops_per_step(probe)
  mlm_steps = round(steps * electra_flops / mlm_flops)
  mlm_dir = runs.train("mlm", MLM, {
      **common, "TRAIN_STEPS": mlm_steps, "CHECKPOINT_PERIOD": mlm_steps,
      "optim.cosine.decay_steps": mlm_steps})
  starts = {"electra": (protocol.last_checkpoint(electra_dir / "discriminator"), steps,
                        electra_flops),
            "mlm": (protocol.last_checkpoint(mlm_dir), mlm_steps, mlm_flops),
            "random": (None, 0, 0.0)}
  results: dict = {"sizes": size, "runs": []}
  for start, (checkpoint, start_step, step_flops) in starts.items():
    for seed in seeds:
      end = start_step + size["finetune_steps"]
      bindings = {"TRAIN_STEPS": end, "RANDOM_SEED": seed, "EVAL_PERIOD": end,
                  "CHECKPOINT_PERIOD": end, "LOG_PERIOD": 1 if fast else 25}
      if checkpoint is None:
        bindings["CheckpointConfig.require_initial_checkpoint"] = False
      else:
        bindings["INITIAL_CHECKPOINT_PATH"] = str(checkpoint)
      directory = runs.train(f"cls_{start}_seed{seed}", CLASSIFIER, bindings)
      row = protocol.eval_rows(directory)["cls_word_order"]
      results["runs"].append({"start": start, "seed": seed, "accuracy": row["accuracy"],
                              "pretrain_steps": start_step,
                              "pretrain_flops": start_step * step_flops})
  accuracies = protocol.grouped(results["runs"], "start", "accuracy")
  results["means"] = {start: statistics.mean(accuracies[start]) for start in starts}
  results["medians"] = {start: statistics.median(accuracies[start]) for start in starts}
  m, med = results["means"], results["medians"]
  results["findings"] = {
      "electra_beats_mlm": m["electra"] > m["mlm"] and med["electra"] > med["mlm"],
      "electra_beats_random": m["electra"] > m["random"] and med["electra"] > med["random"],
      "mlm_beats_random": m["mlm"] > m["random"] and med["mlm"] > med["random"]}
  protocol.finish(out_dir, "electra_vs_mlm", results, figure(results), rows(results))
  return results


def rows(results: dict) -> str:
  by_start = protocol.grouped(results["runs"], "start", lambda r: r)
  cells = []
  for start in ("electra", "mlm", "random"):
    accs = " / ".join(f"{100 * r['accuracy']:.1f}" for r in by_start[start])
    steps = by_start[start][0]["pretrain_steps"]
    cells.append(f"{start} ({steps} pretraining steps): {accs} (mean "
                 f"{100 * results['means'][start]:.1f}, median "
                 f"{100 * results['medians'][start]:.1f})")
  f = results["findings"]
  sign = {True: "+", False: "-"}
  return (f"| ELECTRA vs MLM at equal pretraining FLOPs (Clark et al. 2020, §3.2, Table 1): "
          f"replaced-token detection fine-tunes better | cls_word_order accuracy %, "
          f"fine-tuning seeds {', '.join(str(s) for s in results['sizes']['seeds'])} from "
          f"one pretraining each: {'; '.join(cells)} | "
          f"{'agrees' if f['electra_beats_mlm'] else 'does not agree'} (by mean and median; "
          f"pretraining vs random: ELECTRA {sign[f['electra_beats_random']]}, MLM "
          f"{sign[f['mlm_beats_random']]}) |")


def figure(results: dict):
  plt = protocol.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.2))
  by_start = protocol.grouped(results["runs"], "start", lambda r: 100 * r["accuracy"])
  for i, start in enumerate(("electra", "mlm", "random")):
    accs = by_start[start]
    ax.plot([i] * len(accs), accs, "o", color=f"C{i}", alpha=0.7)
    ax.plot([i - 0.2, i + 0.2], [statistics.mean(accs)] * 2, "-", color=f"C{i}", lw=3)
  ax.axhline(50.6, ls=":", color="gray", label="majority class")
  ax.set_xticks(range(3), ["ELECTRA", "MLM (equal FLOPs)", "random init"])
  ax.set_ylabel("cls_word_order validation accuracy (%)")
  ax.set_title("Fine-tuned after equal-FLOP pretraining (dots: fine-tuning seeds)")
  ax.legend(fontsize=8)
  return fig


def main(argv=None) -> int:
  return protocol.main(argv, __doc__, run)


if __name__ == "__main__":
  sys.exit(main())

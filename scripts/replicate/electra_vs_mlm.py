"""Replication: ELECTRA's replaced-token detection vs masked LM at equal pretraining FLOPs.

    python scripts/replicate/electra_vs_mlm.py --output_dir=/tmp/replicate/electra [--fast]

Claim (docs/replications.md): Clark et al. 2020 (ELECTRA), section 3.2 / Table 1 and
Figure 3: at the same pretraining compute, a discriminator trained by replaced-token
detection fine-tunes better than a masked-LM model of the same size, most clearly
for small models.

Protocol (fixed before the runs, once per seed):
  1. ELECTRA `gin_configs/objectives/electra.gin` (ELECTRA Tiny: discriminator 2 x 64,
             generator 16 wide, embedded corpus, 32 rows of 128 tokens, AdamW with
             cosine decay) for PRETRAIN_STEPS steps; its FLOPs per step are read
             from its train.jsonl (`t5xlike.flops`, generator included).
  2. MLM     `objectives/mlm.gin` + `objectives/_encoder_adamw.gin` (the same
             encoder as the discriminator, the same optimizer and data) for as many
             steps as give the same pretraining FLOPs (its FLOPs per step read from a
             one-step probe run), cosine decay over its own length.
  3. fine-tune `finetune/electra_classifier.gin` from each (ELECTRA: the exported
             discriminator; MLM: the encoder of its checkpoint; the MLM head is not
             restored) on `cls_word_order` (is a sentence in its original word
             order?) for FINETUNE_STEPS steps, lr 1e-3; and from random parameters.
  4. reported validation accuracy on the 512 held-out sentences (majority class
             50.6 %) at the end of fine-tuning; pretraining seeds 0, 1, 2 (the same
             seed fine-tunes).

Writes OUT/results.json, OUT/electra_vs_mlm.png, OUT/rows.md. `--fast`: 10 pretraining
steps, 10 fine-tuning steps, one seed (the mechanics only).
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
    return {"pretrain_steps": 10, "finetune_steps": 10, "seeds": (0,)}
  return {"pretrain_steps": 400, "finetune_steps": 300, "seeds": (0, 1, 2)}


def flops_per_step(model_dir: pathlib.Path) -> float:
  """Model FLOPs of one training step, from the first row of the run's train.jsonl
  (`tflops_per_device` x `step_time_s`, one device)."""
  row = json.loads((model_dir / "metrics" / "train.jsonl").read_text().splitlines()[0])
  return row["tflops_per_device"] * 1e12 * row["step_time_s"]


def run(out_dir: str, fast: bool) -> dict:
  size = sizes(fast)
  seeds = size["seeds"]
  runs = protocol.Runs(out_dir, total=1 + len(seeds) * 5)
  steps = size["pretrain_steps"]
  common = {"EVAL_PERIOD": None, "LOG_PERIOD": 1 if fast else 25}
  probe = runs.train("probe_mlm", MLM, {**common, "TRAIN_STEPS": 1})
  results: dict = {"sizes": size, "runs": []}
  for seed in seeds:
    electra_dir = runs.train(f"electra_seed{seed}", ELECTRA, {
        **common, "TRAIN_STEPS": steps, "RANDOM_SEED": seed, "CHECKPOINT_PERIOD": steps,
        "optim.cosine.decay_steps": steps})
    electra_flops = flops_per_step(electra_dir)
    mlm_steps = round(steps * electra_flops / flops_per_step(probe))
    mlm_dir = runs.train(f"mlm_seed{seed}", MLM, {
        **common, "TRAIN_STEPS": mlm_steps, "RANDOM_SEED": seed, "CHECKPOINT_PERIOD": mlm_steps,
        "optim.cosine.decay_steps": mlm_steps})
    starts = {"electra": (protocol.last_checkpoint(electra_dir / "discriminator"), steps),
              "mlm": (protocol.last_checkpoint(mlm_dir), mlm_steps), "random": (None, 0)}
    for start, (checkpoint, start_step) in starts.items():
      end = start_step + size["finetune_steps"]
      bindings = {"TRAIN_STEPS": end, "RANDOM_SEED": seed, "EVAL_PERIOD": end,
                  "CHECKPOINT_PERIOD": end, "LOG_PERIOD": 1 if fast else 25}
      if checkpoint is None:
        bindings["CheckpointConfig.require_initial_checkpoint"] = False
      else:
        bindings["INITIAL_CHECKPOINT_PATH"] = str(checkpoint)
      directory = runs.train(f"cls_{start}_seed{seed}", CLASSIFIER, bindings)
      row = protocol.eval_rows(directory)["cls_word_order"]
      results["runs"].append({
          "start": start, "seed": seed, "accuracy": row["accuracy"],
          "pretrain_steps": start_step,
          "pretrain_flops": start_step * (electra_flops if start == "electra"
                                          else flops_per_step(probe))})
  accuracies = protocol.grouped(results["runs"], "start", "accuracy")
  results["means"] = {start: statistics.mean(accuracies[start])
                      for start in ("electra", "mlm", "random")}
  results["findings"] = {"electra_beats_mlm": results["means"]["electra"] > results["means"]["mlm"],
                         "electra_beats_random":
                         results["means"]["electra"] > results["means"]["random"],
                         "mlm_beats_random": results["means"]["mlm"] > results["means"]["random"]}
  protocol.finish(out_dir, "electra_vs_mlm", results, figure(results), rows(results))
  return results


def rows(results: dict) -> str:
  by_start = protocol.grouped(results["runs"], "start", lambda r: r)
  cells = []
  for start in ("electra", "mlm", "random"):
    accs = ", ".join(f"{100 * r['accuracy']:.1f}" for r in by_start[start])
    steps = by_start[start][0]["pretrain_steps"]
    cells.append(f"{start} ({steps} pretraining steps): {accs} (mean "
                 f"{100 * results['means'][start]:.1f})")
  f = results["findings"]
  return (f"| ELECTRA vs MLM at equal pretraining FLOPs (Clark et al. 2020, §3.2, Table 1): "
          f"replaced-token detection fine-tunes better | cls_word_order accuracy %, seeds "
          f"{', '.join(str(s) for s in results['sizes']['seeds'])}: {'; '.join(cells)} | "
          f"{'agrees' if f['electra_beats_mlm'] else 'does not agree'} (pretraining vs random: "
          f"ELECTRA {'+' if f['electra_beats_random'] else '-'}, MLM "
          f"{'+' if f['mlm_beats_random'] else '-'}) |")


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
  ax.set_title("Fine-tuned after equal-FLOP pretraining (dots: seeds)")
  ax.legend(fontsize=8)
  return fig


def main(argv=None) -> int:
  return protocol.main(argv, __doc__, run)


if __name__ == "__main__":
  sys.exit(main())

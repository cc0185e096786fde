"""`t5xlike.tasks.distill`: the "Distilling Step-by-Step" mixture from a teacher's `infer`
output file (label task, rationale task, their mixture), and a malformed file named."""
import json

import pytest
import seqio

from t5xlike.tasks import distill


def test_step_by_step_registers_the_label_and_teacher_tasks(tmp_path):
  rows = [{"inputs": f"Count the words: a b c {i}", "targets": "4",
           "prediction": f"there are four words {i}"} for i in range(60)]
  path = tmp_path / "teacher.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert distill.step_by_step(str(path), name="sbs_test", rationale_weight=2.0) == "sbs_test"
  mixture = seqio.get_mixture_or_task("sbs_test")
  assert sorted(t.name for t in mixture.tasks) == ["sbs_test_label", "sbs_test_teacher"]
  assert mixture.get_rate(seqio.get_mixture_or_task("sbs_test_teacher")) == 2.0
  decode = lambda task, ex, k: task.output_features[k].vocabulary.decode(list(ex[k][:-1]))
  pairs = {}
  for name in ("sbs_test_label", "sbs_test_teacher"):
    task = seqio.get_mixture_or_task(name)
    pairs[name] = {split: [(decode(task, ex, "inputs"), decode(task, ex, "targets"))
                           for ex in task.get_dataset(None, split=split, shuffle=False)
                           .as_numpy_iterator()]
                   for split in ("train", "validation")}
  label, teacher = pairs["sbs_test_label"], pairs["sbs_test_teacher"]
  assert len(label["train"]) > 40 and len(label["validation"]) < 20
  assert sorted(label["train"] + label["validation"]) == sorted(
      ("[label] " + r["inputs"], r["targets"]) for r in rows)
  assert sorted(teacher["train"] + teacher["validation"]) == sorted(
      ("[rationale] " + r["inputs"], r["prediction"]) for r in rows)
  assert [x[len("[label] "):] for x, _ in label["train"]] == [
      x[len("[rationale] "):] for x, _ in teacher["train"]]  # the same split of the rows


def test_a_row_without_the_prediction_is_named(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"inputs": "x", "targets": "y"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:1: .*\['prediction'\]"):
    distill.step_by_step(str(path), name="sbs_bad")

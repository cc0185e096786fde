"""`python -m t5xlike.plot`: the PNG, the plotted data equal to the metrics rows, several
runs, and its one-line errors (exit 2, nothing written). Synthetic rows in the format
`t5xlike.metrics.MetricsWriter` writes; no training."""
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from t5xlike import plot, run_metrics
from t5xlike.runs import plot_run

TOKENS_PER_STEP = 32 * (128 + 29)  # the quickstart's batch: 5,024 positions


def _train_row(step, loss, lr, step_time):
  return {"step": step, "accuracy": 1.0 / loss, "grad_norm": 1.0, "learning_rate": lr,
          "loss": loss, "target_tokens": 928.0, "z_loss": 0.01, "step_time_s": step_time,
          "tokens_per_second": TOKENS_PER_STEP / step_time, "mfu": 0.1}


def _write_run(directory, scale=1.0, tasks=("embedded_corpus",)):
  """A run's metrics: train rows at steps 1, 5, ..., 20, eval rows at 10 and 20."""
  train = [_train_row(s, scale * (10.0 - 0.3 * s), 0.1 * min(1.0, s / 10), 0.5 + 0.01 * s)
           for s in (1, 5, 10, 15, 20)]
  evals = [{"step": s, "task": t, "loss": scale * (9.0 - 0.2 * s) + i, "z_loss": 0.01,
            "accuracy": 0.01 * s + 0.1 * i, "target_tokens": 3712}
           for s in (10, 20) for i, t in enumerate(tasks)]
  (directory / "metrics").mkdir(parents=True)
  for kind, rows in (("train", train), ("eval", evals)):
    (directory / "metrics" / f"{kind}.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows))
  return train, evals


def _png_size(path):
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def _lines(fig, panel):
  return {line.get_label(): (np.asarray(line.get_xdata()), np.asarray(line.get_ydata()))
          for line in fig.axes[panel].get_lines()}


def test_writes_a_png_of_the_expected_size(tmp_path, capsys):
  _write_run(tmp_path / "run")
  out = tmp_path / "runs.png"
  assert plot.main([str(tmp_path / "run"), f"--output={out}"]) == 0
  # Four panels, two per row: 2 x 5 in x 90 dpi wide, 2 x 3.2 in x 90 dpi high.
  assert _png_size(out) == (900, 576)
  assert 10_000 < out.stat().st_size < 150_000
  assert capsys.readouterr().out.startswith(f"wrote {out} (900 x 576 px: loss, accuracy, "
                                            "learning_rate, tokens_per_second by step")


def test_plotted_data_equal_the_rows(tmp_path):
  train, evals = _write_run(tmp_path / "run")
  p = plot_run.plan([str(tmp_path / "run")], str(tmp_path / "a.png"))
  assert p.metrics == list(plot_run.DEFAULT_METRICS) and p.labels == ["run"]
  fig = plot_run.figure(p)
  for panel, metric in enumerate(p.metrics):
    lines = _lines(fig, panel)
    assert fig.axes[panel].get_title() == metric
    np.testing.assert_array_equal(lines["run train"][0], [r["step"] for r in train])
    np.testing.assert_allclose(lines["run train"][1], [r[metric] for r in train])
    if metric in ("loss", "accuracy"):
      assert set(lines) == {"run train", "run eval"}
      np.testing.assert_array_equal(lines["run eval"][0], [r["step"] for r in evals])
      np.testing.assert_allclose(lines["run eval"][1], [r[metric] for r in evals])
    else:  # Eval rows log no learning rate nor throughput.
      assert set(lines) == {"run train"}


def test_by_tokens_is_step_times_tokens_per_step(tmp_path):
  train, evals = _write_run(tmp_path / "run")
  run = run_metrics.read(tmp_path / "run")
  # round(tokens_per_second x step_time_s): the batch's token positions.
  assert run.tokens_per_step == TOKENS_PER_STEP
  p = plot_run.plan([str(tmp_path / "run")], str(tmp_path / "a.png"), ["loss"], x="tokens")
  lines = _lines(plot_run.figure(p), 0)
  np.testing.assert_array_equal(lines["run train"][0],
                                [r["step"] * TOKENS_PER_STEP for r in train])
  np.testing.assert_array_equal(lines["run eval"][0],
                                [r["step"] * TOKENS_PER_STEP for r in evals])
  np.testing.assert_allclose(lines["run eval"][1], [r["loss"] for r in evals])


def test_two_runs_two_lines_per_panel_with_their_labels(tmp_path):
  first, _ = _write_run(tmp_path / "a")
  second, _ = _write_run(tmp_path / "b", scale=0.5)
  out = tmp_path / "two.png"
  assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), f"--output={out}",
                    "--metrics=loss,grad_norm,mfu", "--labels=base,half"]) == 0
  assert _png_size(out) == (900, 576)  # three panels: two rows of two
  p = plot_run.plan([str(tmp_path / "a"), str(tmp_path / "b")], str(out),
                    ["loss", "grad_norm", "mfu"], labels=["base", "half"])
  fig = plot_run.figure(p)
  assert len(fig.axes) == 3
  labels = [line.get_label() for line in fig.axes[0].get_lines()]
  assert labels == ["base train", "base eval", "half train", "half eval"]
  assert [line.get_label() for line in fig.axes[1].get_lines()] == ["base train", "half train"]
  lines = _lines(fig, 0)
  np.testing.assert_allclose(lines["base train"][1], [r["loss"] for r in first])
  np.testing.assert_allclose(lines["half train"][1], [r["loss"] for r in second])
  # One colour per run, train and eval alike.
  colours = [line.get_color() for line in fig.axes[0].get_lines()]
  assert colours[0] == colours[1] != colours[2] == colours[3]


def test_eval_of_several_tasks_one_line_per_task(tmp_path):
  _, evals = _write_run(tmp_path / "run", tasks=("first", "second"))
  p = plot_run.plan([str(tmp_path / "run")], str(tmp_path / "a.png"), ["accuracy"])
  lines = _lines(plot_run.figure(p), 0)
  assert set(lines) == {"run train", "run eval first", "run eval second"}
  np.testing.assert_allclose(lines["run eval second"][1],
                             [r["accuracy"] for r in evals if r["task"] == "second"])


def test_crowded_panels_share_one_key_below_them(tmp_path):
  """Three runs x (train + 3 eval tasks) = 12 lines per panel > LEGEND_MAX_LINES: no legend in
  the panels, one key naming the runs, the train style and each task's marker."""
  tasks = ("a_task", "b_task", "c_task")
  dirs = [tmp_path / name for name in ("x", "y", "z")]
  for scale, directory in zip((1.0, 0.8, 0.6), dirs):
    _write_run(directory, scale=scale, tasks=tasks)
  out = tmp_path / "crowded.png"
  p = plot_run.plan(list(map(str, dirs)), str(out), ["loss"])
  assert p.key_entries == ["x", "y", "z", "train", "eval a_task", "eval b_task", "eval c_task"]
  assert plot.main([*map(str, dirs), f"--output={out}", "--metrics=loss"]) == 0
  # One panel (5 in) and a key of 7 entries in 2 columns: 4 rows of 0.25 in.
  assert _png_size(out) == (450, round((3.2 + 4 * 0.25) * 90)) == p.size_px
  fig = plot_run.figure(p)
  assert fig.axes[0].get_legend() is None
  key, = fig.legends
  assert [text.get_text() for text in key.get_texts()] == p.key_entries
  lines = fig.axes[0].get_lines()
  markers = {line.get_label().split(" eval ")[1]: line.get_marker() for line in lines
             if " eval " in line.get_label()}
  assert len(set(markers.values())) == 3  # one shape per task, the same in every run
  assert all(line.get_marker() == markers[line.get_label().split(" eval ")[1]]
             for line in lines if " eval " in line.get_label())
  # Few lines: each panel keeps its legend, no key.
  few = plot_run.plan([str(dirs[0])], str(out), ["loss"])
  assert few.key_entries == [] and plot_run.figure(few).axes[0].get_legend() is not None


def test_torn_lines_and_non_finite_values_are_read_as_the_writer_writes_them(tmp_path):
  _write_run(tmp_path / "run")
  with (tmp_path / "run" / "metrics" / "train.jsonl").open("a") as f:
    f.write(json.dumps(_train_row(25, 1.0, 0.1, 0.5) | {"loss": "nan"}) + "\n")
    f.write('{"step": 30, "loss": 0.')  # a torn last line: skipped
  (series,) = run_metrics.read(tmp_path / "run").series("train", "loss")
  assert series.steps.tolist() == [1, 5, 10, 15, 20, 25] and np.isnan(series.values[-1])


@pytest.mark.parametrize("case", ["no_metrics", "unknown_metric", "bad_x", "labels",
                                  "not_png", "no_dir", "no_output", "unknown_flag"])
def test_errors_are_one_line_exit_2_nothing_written(tmp_path, capsys, case):
  _write_run(tmp_path / "run")
  (tmp_path / "empty").mkdir()
  run, out = str(tmp_path / "run"), tmp_path / "out.png"
  argv = {"no_metrics": [run, str(tmp_path / "empty"), f"--output={out}"],
          "unknown_metric": [run, f"--output={out}", "--metrics=loss,perplexity"],
          "bad_x": [run, f"--output={out}", "--x=time"],
          "labels": [run, f"--output={out}", "--labels=a,b"],
          "not_png": [run, f"--output={tmp_path / 'out.svg'}"],
          "no_dir": [run, f"--output={tmp_path / 'missing' / 'out.png'}"],
          "no_output": [run],
          "unknown_flag": [run, f"--output={out}", "--smooth=3"]}[case]
  before = sorted(tmp_path.rglob("*"))
  assert plot.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert sorted(tmp_path.rglob("*")) == before
  if case == "unknown_metric":
    assert "perplexity" in err and "grad_norm" in err  # names what the runs logged
  if case == "no_metrics":
    assert "empty" in err and "no metrics" in err


def test_without_matplotlib_says_how_to_install_it(tmp_path, capsys, monkeypatch):
  _write_run(tmp_path / "run")
  for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
  assert plot.main([str(tmp_path / "run"), f"--output={tmp_path / 'out.png'}"]) == 2
  assert capsys.readouterr().err == (
      "error: matplotlib is not installed: pip install 't5xlike[plot]'\n")
  assert not (tmp_path / "out.png").exists()


def test_the_command_runs_as_a_module(tmp_path):
  _write_run(tmp_path / "run")
  result = subprocess.run([sys.executable, "-m", "t5xlike.plot", str(tmp_path / "run"),
                           f"--output={tmp_path / 'm.png'}", "--x=tokens"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert _png_size(tmp_path / "m.png") == (900, 576)
  # Reading metrics and drawing needs neither JAX nor TensorFlow.
  probe = subprocess.run([sys.executable, "-c", "import sys, t5xlike.plot; "
                          "print([m for m in ('jax', 'tensorflow') if m in sys.modules])"],
                         capture_output=True, text=True, timeout=120)
  assert probe.stdout.strip() == "[]", probe.stderr

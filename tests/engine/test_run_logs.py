"""What a run leaves to follow it: log.txt's banner and periodic lines, metrics.json, the final evaluation."""
import json
import math
from pathlib import Path

import pytest

from lgd_cli.config.build import build_config
from lgd_cli.engine.train import train
from tests.helpers import run_cli


def strict_json_lines(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, refusing NaN/Infinity (which json.loads accepts by default)."""
    def refuse(name):
        raise ValueError(f"{name} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tiny_overrides, tmp_path_factory):
    """6 iterations, a log line every 2, evaluations after 3 and 6 (every detection kept, so AP is a number)."""
    out = tmp_path_factory.mktemp("logged")
    pairs = tiny_overrides + ["LGD.LOG_PERIOD=2", "TEST.EVAL_PERIOD=3", "MODEL.RETINANET.SCORE_THRESH_TEST=0.0"]
    cfg = build_config("demo", pairs, device="cpu")
    return cfg, out, train(cfg, out)


def test_log_has_the_banner_and_a_line_every_log_period(finished_run, tiny_data):
    _, out, _ = finished_run
    log = (out / "log.txt").read_text()
    assert "lgd train: preset demo, LGD, device cpu, 1 process" in log
    assert f"train set: 8 images, {tiny_data.train_json}" in log and f"val set: 4 images, {tiny_data.val_json}" in log
    assert "iterations: 6" in log and f"output: {out}" in log and "starting at iteration 0" in log
    periodic = [line for line in log.splitlines() if "lgd_cli.periodic" in line]
    assert [line.split("] ")[1].split("  ")[0] for line in periodic] == ["iter 2/6", "iter 4/6", "iter 6/6"]
    for term in ("total_loss", "loss_cls", "loss_box_reg", "loss_distill", "loss_cls.tea", "lr_student", "lr_teacher",
                 "data", "peak mem"):
        assert all(f"{term} " in line for line in periodic), term
    assert "s/iter" in periodic[-1] and "eta 0:00:00" in periodic[-1]
    assert "evaluation after 3 iterations: student bbox AP" in log and "evaluation after 6 iterations" in log


def test_metrics_json_is_strict_json_in_iteration_order(finished_run):
    _, out, _ = finished_run
    rows = strict_json_lines(out / "metrics.json")
    iterations = [row["iteration"] for row in rows]
    assert iterations == sorted(set(iterations)), iterations
    # detectron2 logs an evaluation after 0-based iteration i at i, the final one at MAX_ITER.
    evaluated = [row["iteration"] for row in rows if "student/bbox/AP" in row]
    assert evaluated == [2, 6] and all("teacher/bbox/AP" in row for row in rows if "student/bbox/AP" in row)
    assert [row["iteration"] for row in rows if "loss_cls" in row] == [1, 3, 5]


def test_the_run_ends_evaluated_with_one_final_and_a_best_checkpoint(finished_run):
    _, out, summary = finished_run
    assert summary["evaluation"]["iteration"] == 6
    for who in ("student", "teacher"):
        ap = summary["evaluation"][who]["bbox"]["AP"]
        assert isinstance(ap, float) and math.isfinite(ap) and 0 <= ap <= 100
    assert json.loads((out / "summary.json").read_text(), parse_constant=lambda c: 1 / 0) == summary
    names = {p.name for p in out.glob("*.pth")}
    assert names == {"model_0000002.pth", "model_final.pth", "model_best.pth"}  # no model_0000005 twin
    assert (out / "last_checkpoint").read_text() == "model_final.pth"


def test_resuming_a_finished_run_keeps_its_summary_and_metrics(finished_run):
    from lgd_cli.errors import RunFinished

    cfg, out, summary = finished_run
    metrics = (out / "metrics.json").read_bytes()
    with pytest.raises(RunFinished):
        train(cfg, out, resume=True)
    assert (out / "metrics.json").read_bytes() == metrics
    assert json.loads((out / "summary.json").read_text()) == summary


def test_a_finished_run_the_folder_check_let_through_keeps_its_summary_and_metrics(finished_run, monkeypatch):
    # The training process's own check, should the folder's (run_folder.finished_iterations) miss one.
    from lgd_cli.engine import run_folder

    cfg, out, summary = finished_run
    monkeypatch.setattr(run_folder, "finished_iterations", lambda *args: None)
    metrics = (out / "metrics.json").read_bytes()
    assert train(cfg, out, resume=True) == summary
    assert (out / "metrics.json").read_bytes() == metrics
    assert json.loads((out / "summary.json").read_text()) == summary
    assert "already finished its 6 iterations" in (out / "log.txt").read_text()


def test_no_final_evaluation_when_turned_off(tiny_overrides, tmp_path):
    cfg = build_config("demo", tiny_overrides + ["SOLVER.MAX_ITER=2", "LGD.EVAL_AT_END=False"], device="cpu")
    summary = train(cfg, tmp_path)
    assert "evaluation" not in summary and not (tmp_path / "eval").exists()
    assert not any("student/bbox/AP" in row for row in strict_json_lines(tmp_path / "metrics.json"))


def test_cli_train_prints_log_lines_and_ap_when_stdout_is_no_terminal(tiny_overrides, tmp_path):
    from typer.testing import CliRunner

    from lgd_cli import cli

    args = ["train", "--device", "cpu", "--output", str(tmp_path / "run")]
    for pair in tiny_overrides + ["SOLVER.MAX_ITER=4", "LGD.LOG_PERIOD=2"]:
        args += ["--set", pair]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "lgd train: preset demo" in result.output and "starting at iteration 0" in result.output
    assert "iter 2/4" in result.output and "iter 4/4" in result.output and "loss_distill" in result.output
    assert "student bbox AP on" in result.output.replace("\n", " ")


def test_lgd_plot_draws_the_runs_overlaid(finished_run, tmp_path, capsys):
    _, out, _ = finished_run
    png = tmp_path / "curves" / "runs.png"
    assert run_cli("plot", str(out), str(out), "--output", str(png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in capsys.readouterr().out


def test_lgd_plot_names_a_folder_without_metrics_and_a_missing_matplotlib(finished_run, tmp_path, monkeypatch):
    import sys

    from lgd_cli.compare.plots import plot_runs
    from lgd_cli.errors import DataError, LGDError

    _, out, _ = finished_run
    with pytest.raises(DataError, match=f"{tmp_path} has no metrics.json"):
        plot_runs([out, tmp_path], tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the `plot` extra sees
    with pytest.raises(LGDError, match="needs matplotlib") as info:
        plot_runs([out], tmp_path / "x.png")
    assert "lgd[plot]" in info.value.hint and not (tmp_path / "x.png").exists()

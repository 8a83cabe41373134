"""`lgd compare`: paired statistics, the pairing of the arms, the folder guard, the report, end to end."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from lgd_cli.compare import stats
from lgd_cli.compare.runner import CompareSettings, Run, RunOutcome, prepare_output
from lgd_cli.errors import ConfigError
from tests.helpers import run_cli


# --- statistics on fixed numbers -------------------------------------------------------------

@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (5, 2.5706),
                                          (9, 2.2622), (29, 2.0452), (120, 1.9799)])
def test_paired_t_half_width_uses_the_tabled_quantile(df, expected):
    """Half-width = t_{0.975, n-1} · s / sqrt(n), with t from the printed Student t table."""
    n = df + 1
    diff = stats.paired_difference([0.0] * n, [float(i) for i in range(n)])
    assert (diff.high - diff.mean) * math.sqrt(n) / diff.std == pytest.approx(expected, abs=1e-4)
    assert diff.mean - diff.low == pytest.approx(diff.high - diff.mean)


def test_paired_t_other_confidence_levels():
    diffs = [0.4, 0.1, 0.5]
    for confidence, quantile in ((0.90, 2.9200), (0.99, 9.9248)):  # t_{0.95, 2}, t_{0.995, 2}
        diff = stats.paired_difference([0.0] * 3, diffs, confidence=confidence)
        assert (diff.high - diff.mean) * math.sqrt(3) / diff.std == pytest.approx(quantile, abs=1e-4)


def test_paired_t_interval_of_a_known_sample():
    # differences 0.4, 0.1, 0.5: mean 1/3, s = 0.2082, half-width 4.3027 * s / sqrt(3) = 0.5171
    diff = stats.paired_difference([4.3, 4.5, 4.4], [4.7, 4.6, 4.9])
    assert diff.n == 3 and diff.method == "t"
    assert diff.mean == pytest.approx(1 / 3)
    assert diff.std == pytest.approx(0.208167, abs=1e-6)
    assert diff.low == pytest.approx(1 / 3 - 0.517114, abs=1e-5)
    assert diff.high == pytest.approx(1 / 3 + 0.517114, abs=1e-5)
    # five pairs: t_{0.975,4} = 2.776
    five = stats.paired_difference([0, 0, 0, 0, 0], [1, 2, 3, 4, 5])
    assert five.mean == 3 and five.std == pytest.approx(math.sqrt(2.5))
    assert five.high - five.mean == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), abs=1e-5)


def test_paired_difference_edges():
    one = stats.paired_difference([4.0], [4.5])
    assert (one.n, one.mean, one.std, one.low, one.high) == (1, 0.5, None, None, None)
    same = stats.paired_difference([1.0, 2.0], [1.5, 2.5])  # identical differences: a zero-width interval
    assert same.low == pytest.approx(0.5) and same.high == pytest.approx(0.5)
    with pytest.raises(ValueError):
        stats.paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        stats.paired_difference([1.0, 2.0], [1.0, 2.0], method="z")


def test_bootstrap_interval_is_repeatable_and_inside_the_sample_range():
    base, lgd = [4.3, 4.5, 4.4, 4.1], [4.7, 4.6, 4.9, 4.2]
    a = stats.paired_difference(base, lgd, method="bootstrap")
    b = stats.paired_difference(base, lgd, method="bootstrap")
    assert (a.low, a.high) == (b.low, b.high)
    diffs = [g - x for x, g in zip(base, lgd)]
    assert min(diffs) <= a.low < a.mean < a.high <= max(diffs)
    # it is narrower than the t interval with so few seeds: why t is the default
    t = stats.paired_difference(base, lgd)
    assert a.high - a.low < t.high - t.low


def test_verdict_rules():
    def verdict(low, high, mean=None, n=3):
        mean = (low + high) / 2 if mean is None else mean
        return stats.verdict(stats.PairedDifference(n, mean, 0.1, low, high, "t"))

    assert verdict(0.1, 0.5) == "LGD helps by 0.30 AP [+0.10, +0.50]"
    assert verdict(-0.5, -0.1).startswith("LGD hurts: -0.30 AP [-0.50, -0.10]")
    assert verdict(-0.2, 0.6).startswith("no detectable difference")
    assert verdict(0.0, 0.6).startswith("no detectable difference")  # touching 0 is not a detection
    assert stats.verdict(stats.PairedDifference(1, 0.4, None, None, None, "t")).startswith("one seed only")


def test_mean_std():
    assert stats.mean_std([2.0]) == (2.0, None)
    mean, std = stats.mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)


# --- pairing: seed s of both arms --------------------------------------------------------------

def test_both_arms_of_a_seed_see_the_same_batches_and_initial_student(monkeypatch, tmp_path, tiny_overrides):
    """The LGD modules draw random numbers at construction; the data pipeline must not notice."""
    from lgd_cli.config.build import build_config
    from lgd_cli.engine import train as engine_train

    seen = {}

    class Recorder(engine_train.LGDTrainer):
        def __init__(self, model, data_loader, *args, **kwargs):
            super().__init__(model, data_loader, *args, **kwargs)
            record = seen.setdefault(bool(model.teacher), {})
            record["student"] = {k: v.detach().clone() for k, v in model.student.state_dict().items()}
            batches = self._data_loader_iter

            def recorded():
                for batch in batches:
                    record.setdefault("batch", batch)
                    yield batch
            self._data_loader_iter = recorded()

    monkeypatch.setattr(engine_train, "LGDTrainer", Recorder)
    for lgd in (False, True):
        # one data worker process: augmentation randomness then comes from the loader's seed
        cfg = build_config("demo", tiny_overrides + ["SOLVER.MAX_ITER=1", "DATALOADER.NUM_WORKERS=1", "SEED=5",
                                                     f"MODEL.DISTILLATOR.ENABLED={lgd}"], device="cpu")
        engine_train.train(cfg, tmp_path / str(lgd))
    base, lgd = seen[False], seen[True]
    assert base["student"].keys() == lgd["student"].keys()
    for name, value in base["student"].items():
        assert torch.equal(value, lgd["student"][name]), name
    assert [x["image_id"] for x in base["batch"]] == [x["image_id"] for x in lgd["batch"]]
    for x, y in zip(base["batch"], lgd["batch"]):
        assert torch.equal(x["image"], y["image"])  # the same random flip too
        assert torch.equal(x["instances"].gt_boxes.tensor, y["instances"].gt_boxes.tensor)


# --- the output folder's guard -----------------------------------------------------------------

def _settings(**changes) -> CompareSettings:
    base = dict(preset="demo", preset_file="/p/demo.yaml", recipe="abc", overrides=("TEST.EVAL_PERIOD=2",), seeds=2, iters=4,
                eval_period=2, data={"TRAIN_JSON": "/d/train.json"}, device="cpu")
    return CompareSettings(**{**base, **changes})


def test_output_guard(tmp_path):
    out = tmp_path / "cmp"
    prepare_output(out, _settings(), resume=False)
    assert json.loads((out / "compare-settings.json").read_text())["seeds"] == 2
    with pytest.raises(ConfigError, match="already holds this comparison") as info:
        prepare_output(out, _settings(), resume=False)
    assert "--resume" in info.value.hint
    # neither the interval method, the device nor where the preset file lies makes another comparison
    prepare_output(out, _settings(interval="bootstrap", device="cuda", preset_file="/q/demo.yaml"), resume=True)
    for change, word in ((dict(seeds=3), "seeds"), (dict(iters=8), "iters"), (dict(preset="x.yaml"), "preset"),
                         (dict(recipe="abd"), "recipe"),
                         (dict(data={"TRAIN_JSON": "/other.json"}), "data"),
                         (dict(overrides=("TEST.EVAL_PERIOD=2", "MODEL.DISTILLATOR.LAMBDA=0.5")), "overrides")):
        with pytest.raises(ConfigError, match=f"other settings.*{word}"):
            prepare_output(out, _settings(**change), resume=True)
    other = tmp_path / "busy"
    other.mkdir()
    (other / "model_final.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match="holds no comparison"):
        prepare_output(other, _settings(), resume=False)


def test_settings_refuse_the_keys_compare_sets_itself(tiny_overrides):
    from lgd_cli.compare.runner import make_settings

    with pytest.raises(ConfigError, match="SEED is set by lgd compare"):
        make_settings("demo", tiny_overrides, seeds=2, device="cpu")
    ok = make_settings("demo", [o for o in tiny_overrides if not o.startswith("SEED=")], seeds=2, device="cpu")
    assert ok.iters == 6 and ok.eval_period == 2  # ceil(6 / 5): five points per run by default
    assert ok.data["TRAIN_JSON"].endswith("train.json")
    same = make_settings("demo", [o for o in tiny_overrides if not o.startswith("SEED=")], seeds=2, device="cpu")
    assert same.recipe == ok.recipe
    other = make_settings("demo", [o for o in tiny_overrides if not o.startswith("SEED=")]
                          + ["MODEL.RETINANET.FOCAL_LOSS_GAMMA=1.5"], seeds=2, device="cpu")
    assert other.recipe != ok.recipe


# --- the report on fixed numbers ---------------------------------------------------------------

def _fake_results(aps: dict) -> tuple[dict, list]:
    results, outcomes = {}, []
    for (seed, arm), ap in aps.items():
        run = Run(seed, arm)
        rows = [{"iteration": i, "time": 0.1 if arm == "baseline" else 0.15, "loss_cls": 1.0 / (i + 1),
                 "loss_box_reg": 0.5, **({"loss_cls.tea": 0.8, "loss_distill": 2.0 / (i + 1)} if arm == "lgd" else {})}
                for i in range(19, 100, 20)]
        rows[0]["student/bbox/AP"] = float("nan")  # COCO's answer for a model without detections
        rows[1]["student/bbox/AP"] = ap / 2
        rows[-1]["student/bbox/AP"] = ap
        if arm == "lgd":
            rows[-1]["teacher/bbox/AP"] = 2.5
        metrics = {m: ap for m in ("AP", "AP50", "AP75", "APs", "APm")} | {"APl": None}
        results[run] = {"seed": seed, "arm": arm, "student": {"bbox": metrics}, "s_per_iter": rows[0]["time"],
                        "peak_mb": 1000.0 if arm == "baseline" else 1100.0, "rows": rows, "folder": f"/x/{run.name}",
                        **({"teacher": {"bbox": {"AP": 2.5}}} if arm == "lgd" else {})}
        outcomes.append(RunOutcome(run, reused=False))
    return results, outcomes


def test_seconds_per_iter_is_the_median_of_the_training_rows():
    from lgd_cli.compare.worker import seconds_per_iter

    rows = [{"iteration": 19, "time": 0.4}, {"iteration": 39, "time": 0.2}, {"iteration": 39, "student/bbox/AP": 1.0},
            {"iteration": 59, "time": 0.3}, {"iteration": 79, "time": 0.9}]
    assert seconds_per_iter(rows) == pytest.approx(0.35)  # even count: between the middle two
    assert seconds_per_iter(rows[:4]) == pytest.approx(0.3)
    assert seconds_per_iter([{"iteration": 0, "student/bbox/AP": 1.0}]) is None


def test_worker_reports_a_failed_run_as_plain_error_lines_and_its_exit_code(tmp_path, capsys, monkeypatch):
    """What the runner reads back from compare.log: the last "error:" line, without rich markup."""
    from lgd_cli.compare.worker import RUN_SPEC, main

    monkeypatch.delenv("LGD_DEBUG", raising=False)
    assert main([str(tmp_path)]) == 1  # no run.json: an OSError naming the file
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / RUN_SPEC}: No such file or directory\n")
    (tmp_path / RUN_SPEC).write_text(json.dumps({"preset": "no-such-preset", "overrides": [], "device": "cpu",
                                                 "seed": 0, "arm": "lgd"}))
    assert main([str(tmp_path)]) == 2  # a ConfigError keeps its exit code
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("error: ") and "no-such-preset" in lines[0] and lines[1].startswith("hint: ")
    assert "\x1b[" not in "".join(lines)


def test_report_on_fixed_numbers(tmp_path):
    from lgd_cli.compare.report import build_report, markdown, run_columns, run_rows, summary_rows

    aps = {(0, "baseline"): 4.3, (0, "lgd"): 4.7, (1, "baseline"): 4.5, (1, "lgd"): 4.6,
           (2, "baseline"): 4.4, (2, "lgd"): 4.9}
    results, outcomes = _fake_results(aps)
    outcomes.append(RunOutcome(Run(3, "lgd"), reused=False, exit_code=1, error="error: boom"))
    report = build_report(_settings(seeds=4, iters=100), results, outcomes)
    assert report["paired_seeds"] == [0, 1, 2] and not report["complete"]
    assert report["failed"] == [{"run": "seed3/lgd", "exit_code": 1, "error": "error: boom"}]
    d = report["difference"]["bbox"]["AP"]
    assert d["mean"] == pytest.approx(1 / 3) and d["low"] == pytest.approx(1 / 3 - 0.517114, abs=1e-5)
    assert report["verdict"].startswith("no detectable difference: LGD − baseline = +0.33 AP [-0.18, +0.85]")
    assert report["arms"]["baseline"]["bbox"]["AP"]["mean"] == pytest.approx(4.4)
    assert report["arms"]["teacher"]["bbox"]["AP"]["mean"] == 2.5
    assert report["arms"]["lgd"]["bbox"]["APl"] is None and "APl" not in report["difference"]["bbox"]
    assert "scores below the LGD student" in report["notes"]["weak_teacher"]  # 2.5 < 4.73
    assert report["cost"]["lgd_over_baseline"]["s_per_iter"] == pytest.approx(1.5)
    assert report["cost"]["lgd_over_baseline"]["peak_mb"] == pytest.approx(1.1)
    assert report["runs"][0]["curve"]["bbox"] == {"iterations": [20, 40, 100], "AP": [None, 4.3 / 2, 4.3]}
    json.dumps(report, allow_nan=False)  # compare.json is strict JSON
    rows = run_rows(report)
    assert all(len(row) == len(run_columns(report)) for row in rows)
    assert rows[-1][:2] == ["seed3/lgd", "failed (exit 1): error: boom"]
    assert not any(row[0] == "bbox APl" for row in summary_rows(report))  # nothing scored it
    text = markdown(report, ["ap.png"], None)
    assert "paired t" in text and "upper bound" in text and "seed3/lgd" in text and "![ap](ap.png)" in text
    assert "4.40 ± 0.10" in text and "+0.33 [-0.18, +0.85]" in text


def test_plots_are_written_and_skipped_without_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from lgd_cli.compare.plots import distillation_window, write_plots
    from lgd_cli.compare.report import build_report

    results, outcomes = _fake_results({(0, "baseline"): 4.3, (0, "lgd"): 4.7})
    lgd_folder = tmp_path / "seed0" / "lgd"
    lgd_folder.mkdir(parents=True)
    (lgd_folder / "config.yaml").write_text(
        "MODEL:\n  DISTILLATOR:\n    PRE_NONDISTILL_ITERS: 17\n    POST_NONDISTILL_ITERS: 10\nSOLVER:\n  MAX_ITER: 100\n")
    assert distillation_window(lgd_folder / "config.yaml") == (17, 90, 100)
    report = build_report(_settings(seeds=1, iters=100), results, outcomes)
    for r in report["runs"]:
        r["folder"] = str(tmp_path / r["run"])
    written, skipped = write_plots(report, results, tmp_path)
    assert written == ["ap.png", "losses.png"] and skipped is None
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert write_plots(report, results, tmp_path / "none") == ([], "matplotlib is not installed (pip install 'lgd[plot]')")


# --- end to end --------------------------------------------------------------------------------

@pytest.mark.slow
def test_compare_end_to_end_and_resume(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "cmp"
    # after 4 iterations every score is near the 0.01 prior: keep them all, so AP is a number (not NaN)
    common = [o for o in tiny_overrides if not o.startswith(("SEED=", "SOLVER.MAX_ITER="))]
    common += ["MODEL.RETINANET.SCORE_THRESH_TEST=0.0"]
    args = ["compare", "--seeds", "2", "--iters", "4", "--eval-period", "2", "--output", str(out), "--jobs", "2"]
    for pair in common:
        args += ["--set", pair]
    assert run_cli(*args) == 0
    shown = capsys.readouterr().out
    assert "LGD − baseline" in shown and "verdict:" in shown and "teacher bbox AP" in shown
    report = json.loads((out / "compare.json").read_text())
    assert report["complete"] and report["paired_seeds"] == [0, 1] and report["interval"]["method"] == "t"
    assert len(report["runs"]) == 4 and report["verdict"]
    for run in report["runs"]:
        assert run["curve"]["bbox"]["iterations"] == [2, 4]
        assert (run["arm"] == "lgd") == ("teacher" in run)
        assert run["s_per_iter"] > 0 and run["peak_mb"] > 0
        saved = (out / f"seed{run['seed']}" / run["arm"] / "config.yaml").read_text()
        assert "CHECKPOINT_KEEP: 1\n" in saved  # an arm keeps one periodic checkpoint, not three
    assert (out / "compare.md").read_text().startswith("# lgd compare")
    for name in ("ap.png", "losses.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    # the same command again is refused without --resume, and with other settings at all
    assert run_cli(*args) == 2
    assert "--resume" in capsys.readouterr().err
    assert run_cli(*[a if a != "4" else "6" for a in args], "--resume") == 2
    assert "other settings" in capsys.readouterr().err

    # half-finished: one run lost its result, another its folder; the finished ones are reused
    finals = {name: (out / name / "model_final.pth").stat().st_mtime_ns for name in ("seed0/baseline", "seed0/lgd")}
    (out / "seed1" / "baseline" / "result.json").unlink()
    import shutil
    shutil.rmtree(out / "seed1" / "lgd")
    assert run_cli(*args, "--resume") == 0
    report = json.loads((out / "compare.json").read_text())
    assert sorted(report["reused"]) == ["seed0/baseline", "seed0/lgd"] and report["complete"]
    for name, mtime in finals.items():
        assert (out / name / "model_final.pth").stat().st_mtime_ns == mtime  # not retrained
    assert (out / "seed1" / "lgd" / "result.json").is_file()

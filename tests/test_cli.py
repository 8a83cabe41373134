"""The typer app: help, version, exit codes and messages, and the config each command hands the engine."""
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lgd_cli import __version__, cli

from tests.helpers import run_cli

runner = CliRunner()
run = run_cli


def test_help_lists_the_subcommands():
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "convert-swin-weights", "export", "benchmark", "doctor", "presets"):
        assert command in result.output


def test_version(capsys):
    assert run("--version") == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("args, message, code", [
    (["train", "--preset", "retinanet-r50-x2"], "unknown preset 'retinanet-r50-x2'", 2),
    (["train", "--set", "MODEL.DISTILLATOR.LAMDA=2"], "unknown config key 'MODEL.DISTILLATOR.LAMDA'", 2),
    (["train", "--set", "SOLVER.BASE_LR=0.1"], "SOLVER.BASE_LR is not read", 2),
    (["train", "--set", "SOLVER.MAX_ITER=abc"], "SOLVER.MAX_ITER expects an integer, got 'abc'", 2),
    (["train", "--iters", "0"], "must be positive", 2),
    (["train", "--set", "NOEQUALS"], "is not KEY=VALUE", 2),
    (["train", "--bad-boxes", "fix"], "'fix' is not one of 'clip', 'drop', 'error'", 2),
    (["train", "--no-lgd", "true"], "unexpected extra argument", 2),
    (["export", "m.pth", "--format", "tflite"], "'tflite' is not one of 'torchscript', 'onnx'", 2),
    (["compare", "--interval", "bca"], "'bca' is not one of 't', 'bootstrap'", 2),
    (["eval", "missing.pth"], "missing.pth does not exist", 1),
])
def test_bad_input_is_a_message_not_a_traceback(args, message, code, capsys):
    assert run(*args) == code
    err = capsys.readouterr().err
    assert message in err.replace("\n", " ") and "Traceback" not in err


def test_unknown_preset_suggests_close_names(capsys):
    run("train", "--preset", "retinanet-r50")
    assert "retinanet-r50-2x" in capsys.readouterr().err


def test_train_hands_the_engine_the_resolved_config(monkeypatch, tiny_overrides, tmp_path):
    from lgd_cli.engine import train as engine_train

    seen = {}

    def fake_train(cfg, output, **kwargs):
        seen.update(cfg=cfg, output=output, **kwargs)
        return {"final_checkpoint": str(output / "model_final.pth")}

    monkeypatch.setattr(engine_train, "train", fake_train)
    args = ["train", "--iters", "11", "--no-lgd", "--seed", "5", "--output", str(tmp_path / "run"), "--resume",
            "--keep", "2", "--bad-boxes", "drop"]
    for pair in tiny_overrides:
        args += ["--set", pair]
    args += ["--set", "SOLVER.MAX_ITER=13"]  # the user's --set comes after --iters: it wins
    assert run(*args) == 0
    cfg = seen["cfg"]
    # SEED=7 of tiny_overrides is a --set too, so it beats --seed 5.
    assert cfg.SOLVER.MAX_ITER == 13 and cfg.SEED == 7 and cfg.MODEL.DISTILLATOR.ENABLED is False
    assert cfg.LGD.CLASS_NAMES == ["circle", "square", "triangle", "star", "cross"]
    assert cfg.MODEL.RETINANET.NUM_CLASSES == 5 and cfg.is_frozen()
    assert cfg.LGD.CHECKPOINT_KEEP == 2 and cfg.LGD.DATA.BAD_BOXES == "drop"
    assert seen["output"] == tmp_path / "run" and seen["resume"] is True and seen["num_processes"] == 1


def test_default_output_folder_names_preset_and_arm(monkeypatch, tiny_overrides):
    from lgd_cli.engine import train as engine_train

    outputs = []
    monkeypatch.setattr(engine_train, "train",
                        lambda cfg, output, **kw: outputs.append(output) or {"final_checkpoint": "x"})
    sets = [x for pair in tiny_overrides for x in ("--set", pair)]
    run("train", *sets)
    run("train", "--no-lgd", *sets)
    assert outputs == [Path("output/demo"), Path("output/demo-baseline")]


def test_presets_lists_paper_rows(capsys):
    assert run("presets") == 0
    out = capsys.readouterr().out
    assert "40.4" in out and "42.1" in out and "demo" in out


def test_doctor_reports_detectron2(capsys):
    assert run("doctor") == 0
    out = capsys.readouterr().out
    assert "detectron2" in out and "pycocotools" in out


def test_debug_shows_the_traceback(capsys):
    import os

    with pytest.raises(Exception) as info:
        try:
            run("--debug", "eval", "missing.pth")
        finally:
            os.environ.pop("LGD_DEBUG", None)
    assert "missing.pth does not exist" in str(info.value)


@pytest.mark.parametrize("command", ["train", "eval", "export", "predict", "benchmark", "compare", "convert-swin-weights"])
def test_help_shows_no_value_for_flags_and_the_values_of_choices(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(cli.app, [command, "--help"])
    assert result.exit_code == 0 and "<bool>" not in result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│ --")}
    assert "--help" in lines and "--device" not in lines or "DEVICE" in lines["--device"]
    choices = {"train": ("--bad-boxes", "<clip|drop|error>"), "export": ("--format", "<torchscript|onnx>"),
               "compare": ("--interval", "<t|bootstrap>")}
    if command in choices:
        option, values = choices[command]
        assert values in lines[option]


def test_choices_are_those_the_engines_accept():
    # cli.py declares them itself: importing their sources (torch, detectron2) would slow `lgd --help`.
    from lgd_cli.compare.stats import METHODS
    from lgd_cli.config.choices import BAD_BOX_POLICIES

    assert tuple(m.value for m in cli.Interval) == METHODS
    assert tuple(m.value for m in cli.BadBoxes) == BAD_BOX_POLICIES


def test_train_options_reach_their_config_keys(capsys, tiny_overrides, tmp_path):
    import yaml

    run_dir = tmp_path / "run"
    assert run("train", *[x for pair in tiny_overrides for x in ("--set", pair)], "--print-config", "--iters", "9",
               "--batch-size", "4", "--eval-period", "3", "--workers", "2", "--seed", "11", "--keep", "5",
               "--bad-boxes", "error", "--skip-nonfinite", "2", "--no-lgd", "--skip-bad-images",
               "--allow-outside-root", "--output", str(run_dir)) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert not run_dir.exists()  # printed, nothing written
    # tiny_overrides' own --set SOLVER.MAX_ITER=6 / IMS_PER_BATCH=2 / NUM_WORKERS=0 / SEED=7 come after: they win.
    assert (cfg["SOLVER"]["MAX_ITER"], cfg["SOLVER"]["IMS_PER_BATCH"], cfg["DATALOADER"]["NUM_WORKERS"], cfg["SEED"]) \
        == (6, 2, 0, 7)
    assert cfg["TEST"]["EVAL_PERIOD"] == 3 and cfg["LGD"]["CHECKPOINT_KEEP"] == 5 and cfg["LGD"]["SKIP_NONFINITE"] == 2
    assert cfg["MODEL"]["DISTILLATOR"]["ENABLED"] is False and cfg["LGD"]["DATA"]["BAD_BOXES"] == "error"
    assert cfg["LGD"]["DATA"]["SKIP_BAD_IMAGES"] is True and cfg["LGD"]["DATA"]["ALLOW_OUTSIDE_ROOT"] is True

    assert run("train", "--print-config", "--iters", "9", "--batch-size", "4", "--workers", "3", "--seed", "11",
               "--output", str(run_dir)) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["SOLVER"]["MAX_ITER"], cfg["SOLVER"]["IMS_PER_BATCH"], cfg["DATALOADER"]["NUM_WORKERS"], cfg["SEED"]) \
        == (9, 4, 3, 11)
    assert cfg["MODEL"]["DISTILLATOR"]["ENABLED"] is True and not run_dir.exists()


def test_export_and_compare_hand_their_choices_to_the_engines(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from lgd_cli import export as engine_export
    from lgd_cli.compare import experiment

    seen = []
    monkeypatch.setattr(engine_export, "export_checkpoint", lambda checkpoint, fmt, output: seen.append(fmt))
    monkeypatch.setattr("lgd_cli.render.export", lambda result: None)
    assert run("export", "m.pth", "--format", "onnx") == 0
    monkeypatch.setattr(experiment, "run_comparison",
                        lambda settings, output, **kw: seen.append(settings.interval) or {"failed": []})
    monkeypatch.setattr("lgd_cli.render.comparison", lambda report: None)

    def fake_settings(preset, pairs, **kwargs):
        seen.append(pairs)
        return SimpleNamespace(preset_file="demo.yaml", **kwargs)

    monkeypatch.setattr("lgd_cli.compare.runner.make_settings", fake_settings)
    assert run("compare", "--interval", "bootstrap", "--iters", "8", "--eval-period", "4",
               "--output", str(tmp_path / "c")) == 0
    assert seen == ["onnx", ["SOLVER.MAX_ITER=8", "TEST.EVAL_PERIOD=4"], "bootstrap"]

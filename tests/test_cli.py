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
    (["train", "--bad-boxes", "fix"], "must be clip, drop or error", 2),
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

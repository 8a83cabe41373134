"""Usage mistakes through the `lgd` command: one `error:` line and a `hint:`, nothing written.

Files that are not checkpoints, run folders given where a checkpoint goes, `--resume` of nothing
or of a finished run (issue #15, item 4).
"""
import json
import shutil

import pytest

from tests.helpers import run_cli


def sets(pairs):
    return [x for pair in pairs for x in ("--set", pair)]


def _err(capsys) -> str:
    err = capsys.readouterr().err.replace("\n", " ")
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("name, content, message, hint", [
    ("notes.txt", b"remember to train longer\n", "notes.txt is a text file, not a checkpoint", ".pth"),
    ("config.yaml", b"_BASE_: demo.yaml\nSOLVER:\n  MAX_ITER: 10\n", "config.yaml is a YAML file (a config?), not a checkpoint",
     "lgd train --preset"),
    ("settings.txt", b"MODEL:\n  DEVICE: cpu\n", "settings.txt is a YAML file (a config?)", "--preset"),
    ("blob.pth", bytes(range(7, 256)) * 4, "blob.pth is not a checkpoint (unknown format)", ".pth"),
    ("empty.pth", b"", "empty.pth is not a readable checkpoint (the file is empty)", "truncated"),
])
@pytest.mark.parametrize("command", ["eval", "convert-swin-weights", "export", "predict"])
def test_a_file_that_is_not_a_checkpoint_is_named_for_what_it_is(capsys, tmp_path, tiny_data, command, name, content,
                                                                 message, hint):
    path = tmp_path / name
    path.write_bytes(content)
    extra = [str(sorted(tiny_data.val_images.glob("*.png"))[0]), "-o", str(tmp_path / "p")] if command == "predict" else []
    assert run_cli(command, str(path), *extra) == 1
    err = _err(capsys)
    assert f"error: {tmp_path}/{message}" in err
    assert "hint: " in err and hint in err.split("hint: ", 1)[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written beside it


def _fake_evaluate(monkeypatch):
    from lgd_cli.engine import evaluate as engine_eval

    seen = []
    monkeypatch.setattr(engine_eval, "evaluate_checkpoint", lambda checkpoint, **kw: seen.append(checkpoint) or {})
    monkeypatch.setattr("lgd_cli.render.evaluation", lambda results: None)
    return seen


def test_a_run_folder_stands_for_its_last_checkpoint(monkeypatch, tmp_path):
    seen = _fake_evaluate(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_final.pth").write_bytes(b"x")
    assert run_cli("eval", str(run)) == 0
    (run / "model_0000004.pth").write_bytes(b"x")
    (run / "last_checkpoint").write_text("model_0000004.pth")
    assert run_cli("eval", str(run)) == 0
    assert seen == [run / "model_final.pth", run / "model_0000004.pth"]


@pytest.mark.parametrize("command", ["eval", "export", "predict"])
def test_a_folder_without_checkpoint_says_so(capsys, tmp_path, command):
    (tmp_path / "notes.txt").write_text("x")
    extra = ["image.png"] if command == "predict" else []
    assert run_cli(command, str(tmp_path), *extra) == 1
    err = _err(capsys)
    assert f"error: {tmp_path} is a folder that holds no checkpoint" in err and "hint: " in err
    assert "does not exist" not in err


@pytest.mark.parametrize("made", [False, True])
def test_resume_of_nothing_is_an_error(capsys, tiny_overrides, tmp_path, made):
    run = tmp_path / "run"
    if made:
        run.mkdir()
    assert run_cli("train", *sets(tiny_overrides), "--resume", "--output", str(run)) == 2
    err = _err(capsys)
    what = "holds no run (no config.yaml, no checkpoint)" if made else "does not exist"
    assert f"error: --resume: {run} {what}, so there is nothing to continue" in err and "hint: " in err
    assert (sorted(run.iterdir()) == [] if made else not run.exists())


def test_resume_of_a_finished_run_changes_nothing(capsys, trained_checkpoint, tiny_overrides, tmp_path, monkeypatch):
    from lgd_cli.engine import train as engine_train

    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint.parent, run)
    (run / ".lgd.lock").unlink(missing_ok=True)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir() if p.is_file()}
    monkeypatch.setattr(engine_train, "launch", lambda *a, **k: pytest.fail("a finished run was trained"))
    pairs = tiny_overrides + ["SOLVER.MAX_ITER=2"]  # the iterations it was trained for
    assert run_cli("train", *sets(pairs), "--resume", "--output", str(run)) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert f"{run} already finished at iteration 2; nothing to do" in out and "--iters" in out
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir() if p.is_file() and p.name != ".lgd.lock"}
    assert after == before
    assert json.loads((run / "summary.json").read_text())["total_loss"] is not None

    # More iterations than it was trained for: it continues.
    seen = []
    monkeypatch.setattr(engine_train, "launch", lambda *a, **k: seen.append(k["args"][2]) or {"final_checkpoint": "x"})
    assert run_cli("train", *sets(pairs + ["SOLVER.MAX_ITER=4"]), "--resume", "--output", str(run)) == 0
    assert seen == [True]


def test_resume_of_a_finished_run_stops_every_machine_with_the_note(trained_checkpoint, tiny_overrides, tmp_path):
    import socket
    import threading

    from lgd_cli.config.build import build_config
    from lgd_cli.engine.train import train
    from lgd_cli.errors import RunFinished

    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint.parent, run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    cfg = build_config("demo", tiny_overrides + ["SOLVER.MAX_ITER=2"], device="cpu")
    common = {"resume": True, "num_machines": 2, "dist_url": url, "join_timeout": 30}
    raised = []

    def machine_0():
        try:
            train(cfg, run, machine_rank=0, **common)
        except RunFinished as exc:
            raised.append(exc)

    thread = threading.Thread(target=machine_0, daemon=True)
    thread.start()
    with pytest.raises(RunFinished) as info:
        train(cfg, tmp_path / "machine1", machine_rank=1, **common)
    thread.join(30)
    assert info.value.message == f"machine 0: {run} already finished at iteration 2; nothing to do"
    assert info.value.exit_code == 0 and raised and raised[0].exit_code == 0

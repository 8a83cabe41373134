"""One run per folder: the training process holds an OS lock on it; a second `lgd train` is refused,
naming the first; a killed holder frees the folder at once (issue #15, item 9)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import run_cli
from lgd_cli.engine.run_folder import LOCK_FILE, RunFolderLock, holds_run
from lgd_cli.errors import LGDError

_HOLD = ("import sys, time; from lgd_cli.engine.run_folder import RunFolderLock; "
         "RunFolderLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")


def sets(pairs):
    return [x for pair in pairs for x in ("--set", pair)]


@pytest.fixture
def holder(tmp_path):
    """A child process holding the lock of tmp_path/run; yields it (killed at the end)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline().strip() == b"locked"
    yield child
    child.kill()
    child.wait()


def test_a_live_run_refuses_a_second_train_then_a_killed_one_frees_the_folder(capsys, tiny_overrides, tmp_path,
                                                                              holder, monkeypatch):
    from lgd_cli.engine import train as engine_train

    run = tmp_path / "run"
    (run / "config.yaml").write_text("a run's")
    (run / "model_0000002.pth").write_bytes(b"its checkpoint")
    monkeypatch.setattr(engine_train, "launch", lambda *a, **k: {"final_checkpoint": "x"})
    for extra in ([], ["--resume"], ["--force"]):
        assert run_cli("train", *sets(tiny_overrides), "--output", str(run), *extra) == 1
        err = capsys.readouterr().err.replace("\n", " ")
        assert f"error: {run} is in use by another training run: pid {holder.pid} on " in err
        assert "python -c" in err and "hint: " in err and "Traceback" not in err
    # --force did not clear the live run's folder.
    assert sorted(p.name for p in run.iterdir()) == sorted([LOCK_FILE, "config.yaml", "model_0000002.pth"])

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert run_cli("train", *sets(tiny_overrides), "--output", str(run), "--force") == 0
    assert (run / LOCK_FILE).is_file() and not (run / "model_0000002.pth").exists()


def test_the_lock_file_is_not_a_run_and_a_failed_fresh_run_leaves_no_folder(tiny_overrides, tmp_path, monkeypatch):
    from lgd_cli.engine import train as engine_train

    def failing_launch(*args, **kwargs):
        raise LGDError("image x.png cannot be decoded")

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / LOCK_FILE).write_text("")
    assert not holds_run(tmp_path / "old")
    monkeypatch.setattr(engine_train, "launch", failing_launch)
    assert run_cli("train", *sets(tiny_overrides), "--output", str(tmp_path / "new")) == 1
    assert not (tmp_path / "new").exists()


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    lock = RunFolderLock(tmp_path)
    lock.acquire()
    ready, told = os.pipe()
    pid = os.fork()  # as a data-loader worker is
    if pid == 0:
        os.write(told, b"1")  # past the fork handlers
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"1"
        lock.release()
        again = RunFolderLock(tmp_path)
        again.acquire()  # the child, still alive, holds nothing
        again.release()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with RunFolderLock(tmp_path):
        with pytest.raises(LGDError, match=f"pid {os.getpid()}"):
            RunFolderLock(tmp_path).acquire()

"""Several machines: the same `lgd train` on each, here two "machines" on localhost over gloo.

The fast tests stop before any training process starts (the rendezvous refuses first); the slow ones
run two (or with --gpus 2, four) real training processes from two `lgd train` commands.
"""
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.helpers import run_cli
from lgd_cli.engine.launch import launch, report_failure
from lgd_cli.errors import DataError, LGDError

LGD = [sys.executable, "-m", "lgd_cli.cli"]


def sets(pairs):
    return [x for pair in pairs for x in ("--set", pair)]


def free_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _never_called():
    raise AssertionError("no training process may start")


def _in_thread(fn, **kwargs):
    """Run fn(**kwargs) in a thread (another machine's launcher); returns a list the raised error lands in."""
    raised = []

    def target():
        try:
            fn(**kwargs)
        except LGDError as exc:
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, raised


# --- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, message", [
    ("auto", "--dist-url auto needs --machines 1"),
    ("127.0.0.1:29500", "--dist-url 127.0.0.1:29500 is not tcp://HOST:PORT"),
    ("tcp://127.0.0.1", "--dist-url tcp://127.0.0.1 is not tcp://HOST:PORT"),
    ("tcp://127.0.0.1:0", "--dist-url tcp://127.0.0.1:0 is not tcp://HOST:PORT"),
])
def test_several_machines_need_a_tcp_dist_url(capsys, tiny_overrides, tmp_path, url, message):
    code = run_cli("train", *sets(tiny_overrides), "--device", "cpu", "--output", str(tmp_path / "run"),
                   "--machines", "2", "--machine-rank", "1", "--dist-url", url)
    err = capsys.readouterr().err.replace("\n", " ")
    assert code == 2 and message in err and "hint: " in err and "tcp://10.0.0.1:29500" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


# --- the rendezvous, without training processes ------------------------------------------------------

def test_a_machine_that_never_joins_is_named_after_the_join_timeout(capsys, tiny_overrides, tmp_path):
    url = free_url()
    start = time.monotonic()
    code = run_cli("train", *sets(tiny_overrides), "--device", "cpu", "--output", str(tmp_path / "run"),
                   "--machines", "2", "--machine-rank", "0", "--dist-url", url, "--join-timeout", "2")
    err = capsys.readouterr().err.replace("\n", " ")
    assert code == 1 and f"error: machine 1 did not join {url} within 2 s" in err and "--join-timeout" in err
    assert time.monotonic() - start < 30
    assert not (tmp_path / "run").exists()  # machine 0's config.yaml is gone with the folder it created


def test_machine_0_that_never_comes_is_named_on_the_others():
    url = free_url()
    with pytest.raises(LGDError, match=f"^machine 0 did not join {url} within 1 s$") as info:
        launch(_never_called, 1, num_machines=2, machine_rank=1, dist_url=url, use_cuda=False, join_timeout=1)
    assert "--machine-rank 0" in info.value.hint


@pytest.mark.parametrize("theirs, message", [
    ({"agree": {"--resume": True}}, "machine 0 was started with --resume False, machine 1 with --resume True"),
    ({"num_processes": 2}, "machine 0 was started with --gpus 1, machine 1 with --gpus 2"),
    ({"agree": {"--resume": False, "config": {"SOLVER.MAX_ITER": "8"}}},
     "machine 0 and machine 1 have different configs: SOLVER.MAX_ITER 4 vs 8"),
])
def test_machines_started_differently_are_refused_on_every_machine(theirs, message):
    url = free_url()
    mine = {"worker": _never_called, "num_processes": 1, "num_machines": 2, "dist_url": url, "use_cuda": False,
            "join_timeout": 20, "agree": {"--resume": False, "config": {"SOLVER.MAX_ITER": "4"}}}
    thread, raised = _in_thread(launch, **mine, machine_rank=0)
    with pytest.raises(LGDError) as info:
        launch(**{**mine, **theirs}, machine_rank=1)
    thread.join(30)
    assert info.value.message == message and raised and raised[0].message == message
    assert "only --machine-rank differs" in info.value.hint


def test_two_machines_of_one_rank_are_refused():
    url = free_url()
    args = {"worker": _never_called, "num_processes": 1, "num_machines": 3, "dist_url": url, "use_cuda": False,
            "join_timeout": 20}
    first, first_raised = _in_thread(launch, **args, machine_rank=0)
    second, second_raised = _in_thread(launch, **args, machine_rank=1)
    with pytest.raises(LGDError, match="two machines were started with --machine-rank 1"):
        time.sleep(1)
        launch(**args, machine_rank=1)
    first.join(30)
    second.join(30)
    assert "two machines were started with --machine-rank 1" in first_raised[0].message


def test_a_failure_before_joining_stops_the_waiting_machines_at_once():
    url = free_url()
    thread, raised = _in_thread(launch, worker=_never_called, num_processes=1, num_machines=2, machine_rank=0,
                                dist_url=url, use_cuda=False, join_timeout=60)
    start = time.monotonic()
    report_failure(DataError("annotation file not found: /data/ann.json", hint="check the path"),
                   num_machines=2, machine_rank=1, dist_url=url)
    thread.join(30)
    assert time.monotonic() - start < 15
    assert isinstance(raised[0], DataError) and raised[0].message == "machine 1: annotation file not found: /data/ann.json"
    assert raised[0].hint == "check the path" and raised[0].exit_code == 1


def test_a_run_that_has_started_is_left_alone():
    from datetime import timedelta

    import torch.distributed as dist

    url = free_url()
    port = int(url.rsplit(":", 1)[1])
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    store.set("lgd/started", "1")  # what a running job's launchers have set
    with pytest.raises(LGDError, match=f"{url} belongs to a run that has started without this machine"):
        launch(_never_called, 1, num_machines=2, machine_rank=1, dist_url=url, use_cuda=False, join_timeout=5)
    report_failure(DataError("bad"), num_machines=2, machine_rank=1, dist_url=url, wait_s=2)
    assert not store.check(["lgd/failure"]) and not store.check(["lgd/count/1"])


def _killed_on_rank_1():
    import signal

    from detectron2.utils import comm

    if comm.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # machine 0's process is stopped by its launcher long before
    comm.synchronize()


@pytest.mark.slow
def test_a_killed_process_on_one_machine_stops_the_other_naming_it():
    url = free_url()
    args = {"worker": _killed_on_rank_1, "num_processes": 1, "num_machines": 2, "dist_url": url, "use_cuda": False,
            "join_timeout": 120}
    thread, raised = _in_thread(launch, **args, machine_rank=0)
    with pytest.raises(LGDError) as info:
        launch(**args, machine_rank=1)
    start = time.monotonic()
    thread.join(60)
    assert time.monotonic() - start < 15
    assert info.value.message == "machine 1, rank 1 was killed by SIGKILL" and info.value.exit_code == 137
    assert raised[0].message == info.value.message and raised[0].exit_code == 137


# --- real runs: two `lgd train` commands ------------------------------------------------------------

def _machines(*commands, timeout=600):
    """Run one `lgd train` per machine at once; returns [(exit code, stdout, stderr)] in machine order."""
    env = {**os.environ, "COLUMNS": "200"}
    procs = [subprocess.Popen([*LGD, "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for args in commands]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append((proc.returncode, out, err))
    return results


def _commands(pairs, outputs, *extra, gpus=1):
    url = free_url()
    return [[*sets(pairs), "--device", "cpu", "--output", str(out), "--gpus", str(gpus), "--machines", str(len(outputs)),
             "--machine-rank", str(rank), "--dist-url", url, "--join-timeout", "120", *extra]
            for rank, out in enumerate(outputs)]


def _iteration(path) -> int:
    return torch.load(path, weights_only=True)["trainer"]["iteration"]


def _finished(results):
    for code, out, err in results:
        assert code == 0, f"exit {code}\n{out}\n{err}"
        assert "Traceback" not in err
    assert "machine 0 wrote the run" in results[1][1].replace("\n", " ")


RUN_FILES = {"config.yaml", "metrics.json", "summary.json", "last_checkpoint", "model_final.pth"}


@pytest.mark.slow
def test_shared_run_folder_finishes_resumes_and_refuses_a_second_run(tiny_overrides, tmp_path):
    run = tmp_path / "shared"
    pairs = tiny_overrides + ["SOLVER.MAX_ITER=4", "SOLVER.CHECKPOINT_PERIOD=2"]
    _finished(_machines(*_commands(pairs, [run, run])))
    assert RUN_FILES <= {p.name for p in run.iterdir()} and (run / "log.txt.rank1").is_file()
    assert _iteration(run / "model_final.pth") == 3

    # The same folder without --resume: machine 0 refuses it, and machine 1 hears so at once.
    refused = _machines(*_commands(pairs, [run, run]))
    assert [code for code, _, _ in refused] == [2, 2]
    assert f"error: {run} already holds a training run" in refused[0][2]
    assert f"error: machine 0: {run} already holds a training run" in refused[1][2].replace("\n", " ")

    _finished(_machines(*_commands(tiny_overrides + ["SOLVER.MAX_ITER=6", "SOLVER.CHECKPOINT_PERIOD=2"],
                                   [run, run], "--resume")))
    assert _iteration(run / "model_final.pth") == 5
    assert "resuming from" in (run / "log.txt.rank1").read_text()


@pytest.mark.slow
def test_separate_run_folders_finish_and_resume_from_machine_0s_checkpoint(tiny_overrides, tmp_path):
    run0, run1 = tmp_path / "machine0", tmp_path / "machine1"
    pairs = tiny_overrides + ["SOLVER.MAX_ITER=4", "SOLVER.CHECKPOINT_PERIOD=2"]
    _finished(_machines(*_commands(pairs, [run0, run1])))
    assert RUN_FILES <= {p.name for p in run0.iterdir()}
    assert {p.name for p in run1.iterdir()} == {"log.txt.rank1"}  # nothing of the run's own

    _finished(_machines(*_commands(tiny_overrides + ["SOLVER.MAX_ITER=6", "SOLVER.CHECKPOINT_PERIOD=2"],
                                   [run0, run1], "--resume")))
    assert _iteration(run0 / "model_final.pth") == 5
    assert {p.name for p in run1.iterdir()} == {"log.txt.rank1"}
    assert f"resuming from {run0 / 'model_final.pth'} at iteration 4 (sent by the main process)" in \
        (run1 / "log.txt.rank1").read_text()


@pytest.mark.slow
def test_a_machine_failing_in_training_stops_both_naming_it(tiny_data, tiny_overrides, tmp_path):
    # Machine 1's copy of the images is broken: its process fails on its first batch.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_data.train_images, broken)
    for image in broken.iterdir():
        image.write_bytes(image.read_bytes()[:100])
    pairs = tiny_overrides + ["SOLVER.MAX_ITER=20"]
    commands = _commands(pairs, [tmp_path / "run0", tmp_path / "run1"])
    commands[1] += ["--set", f"LGD.DATA.TRAIN_IMAGES={broken}"]
    results = _machines(*commands)
    for code, _, err in results:
        err = err.replace("\n", " ")
        assert code == 1 and "error: machine 1, rank 1: image " in err and "cannot be decoded" in err
        assert "--skip-bad-images" in err and "Traceback" not in err
    assert not (tmp_path / "run0").exists()  # a new run that failed before its first checkpoint leaves nothing


@pytest.mark.slow
def test_two_machines_of_two_cpu_processes(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    pairs = tiny_overrides + ["SOLVER.MAX_ITER=2", "SOLVER.CHECKPOINT_PERIOD=2", "SOLVER.IMS_PER_BATCH=4"]
    _finished(_machines(*_commands(pairs, [run, run], gpus=2)))
    assert _iteration(run / "model_final.pth") == 1
    assert {f"log.txt.rank{r}" for r in (1, 2, 3)} <= {p.name for p in run.iterdir()}

"""With several processes the stop signal travels in the step's own all-reduce (with the loss values):
GracefulStopHook makes no collective, and no host sync, of its own."""
import signal
from types import SimpleNamespace

import pytest
import torch
from detectron2.utils import comm

from lgd_cli.engine.hooks import GracefulStopHook, TrainingStopped
from tests.helpers import LGD, make_trainer, sets


def test_the_step_carries_this_process_stop_signal(tiny_overrides):
    _, _, trainer = make_trainer(tiny_overrides, size=128)
    hook = GracefulStopHook(checkpointer=None)
    hook.trainer = trainer
    hook.before_train()
    try:
        trainer.train(0, 1)  # registers no stop hook: only the value travels
        assert trainer.stop_signal_all == 0
        hook.received = signal.SIGTERM
        trainer.train(1, 2)
        assert trainer.stop_signal_all == signal.SIGTERM
    finally:
        hook.after_train()


def test_every_process_stops_on_the_reduced_signal_without_a_collective_of_its_own(monkeypatch, tmp_path):
    saved = []
    checkpointer = SimpleNamespace(save=saved.append, save_dir=str(tmp_path))
    hook = GracefulStopHook(checkpointer)
    # This process got no signal; another one did (the reduced maximum says so).
    hook.trainer = SimpleNamespace(iter=5, stop_signal_all=int(signal.SIGTERM), gather_resume_state=lambda: None)
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "synchronize", lambda: None)
    monkeypatch.setattr(comm, "is_main_process", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: pytest.fail("an all-reduce of its own"))
    with pytest.raises(TrainingStopped) as info:
        hook.after_step()
    assert saved == ["model_0000005"] and info.value.exit_code == 128 + signal.SIGTERM
    hook.trainer.stop_signal_all = 0
    hook.after_step()  # nothing asked anywhere: the run goes on


def _spawned_workers(pid: int) -> list[int]:
    from pathlib import Path

    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(c) for c in children
                  if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes())


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/task"), reason="reads /proc (Linux)")
def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_iteration(tiny_overrides, tmp_path):
    import subprocess
    import time

    out = tmp_path / "term2"
    pairs = tiny_overrides + ["SOLVER.MAX_ITER=60", "SOLVER.CHECKPOINT_PERIOD=5"]
    proc = subprocess.Popen([*LGD, "train", "--gpus", "2", "--device", "cpu", "--output", str(out), *sets(pairs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "model_0000004.pth").is_file() and time.time() < deadline:
        time.sleep(0.1)
    workers = _spawned_workers(proc.pid)
    assert len(workers) == 2, workers
    __import__("os").kill(workers[-1], signal.SIGTERM)  # one process only
    _, err = proc.communicate(timeout=300)  # the other one would hang in its next all-reduce
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err
    stopped_at = torch.load(out / (out / "last_checkpoint").read_text(), weights_only=True)["trainer"]["iteration"]
    assert 4 <= stopped_at < 59

"""A real `lgd train` killed with SIGKILL after its first checkpoint, resumed, then evaluated."""
import json
import signal
import subprocess
import time

import pytest
import torch

from tests.helpers import LGD, lgd, sets


@pytest.mark.slow
def test_sigkill_after_first_checkpoint_then_resume_and_eval(tiny_overrides, tmp_path):
    out = tmp_path / "killed"
    pairs = tiny_overrides + ["SOLVER.MAX_ITER=8", "SOLVER.CHECKPOINT_PERIOD=2"]
    proc = subprocess.Popen([*LGD, "train", "--output", str(out), *sets(pairs)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # Checkpoints appear by rename, complete: the first one existing is the moment to kill.
    while not list(out.glob("model_*.pth")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    assert not (out / "model_final.pth").exists()

    lgd("train", "--output", str(out), "--resume", *sets(pairs))
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert torch.load(out / "model_final.pth", weights_only=True)["trainer"]["iteration"] == 7
    assert not list(out.glob(".*.tmp"))
    lines = (out / "metrics.json").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines if "total_loss" in line][-1] == 7

    result = lgd("eval", str(out / "model_final.pth"))
    assert "AP50" in result.stdout
    assert "bbox" in json.loads((out / "eval" / "metrics.json").read_text())["student"]

"""A real `lgd train` killed with SIGKILL after its first checkpoint, resumed, then evaluated."""
import json
import signal

import pytest
import torch

from tests.helpers import lgd, sets, signal_at_first_checkpoint


@pytest.mark.slow
def test_sigkill_after_first_checkpoint_then_resume_and_eval(tiny_overrides, tmp_path):
    out = tmp_path / "killed"
    pairs = tiny_overrides + ["SOLVER.MAX_ITER=8", "SOLVER.CHECKPOINT_PERIOD=2"]
    returncode, err = signal_at_first_checkpoint(out, pairs, signal.SIGKILL)
    assert returncode == -signal.SIGKILL, err
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

"""A run interrupted at a checkpoint and resumed ends bit-identical to an uninterrupted one (same seed, CPU)."""
import json
import shutil

import pytest
import torch

from lgd_cli.files import repair_json_lines
from tests.helpers import lgd, sets


def _tensors(state, prefix=""):
    """Every tensor and number in a nested checkpoint entry, by path."""
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in _tensors(value, f"{prefix}{key}.").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, value in enumerate(state) for k, v in _tensors(value, f"{prefix}{i}.").items()}
    return {prefix: state} if isinstance(state, (torch.Tensor, int, float)) else {}


@pytest.mark.slow
def test_resumed_run_is_bit_identical(tiny_overrides, tmp_path):
    # Two data-loader workers: the batches must not depend on which worker mapped them.
    pairs = tiny_overrides + ["SOLVER.MAX_ITER=4", "SOLVER.CHECKPOINT_PERIOD=2", "DATALOADER.NUM_WORKERS=2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    # Both runs in fresh processes: an earlier in-process test may have run detectron2's scripted
    # focal loss through TorchScript's optimised plans, which round differently (engine/train.py).
    lgd("train", "--device", "cpu", "--output", str(whole), *sets(pairs))
    # What a kill -9 after the first checkpoint leaves behind: that checkpoint and the config.
    resumed.mkdir()
    shutil.copy(whole / "model_0000001.pth", resumed)
    shutil.copy(whole / "config.yaml", resumed)
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    # The same command with --resume, in a fresh process as after a real kill (a process's warm
    # state, e.g. TorchScript's optimised plans, must not change the numbers).
    lgd("train", "--device", "cpu", "--output", str(resumed), "--resume", *sets(pairs))

    a = torch.load(whole / "model_final.pth", weights_only=True)
    b = torch.load(resumed / "model_final.pth", weights_only=True)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 3
    for part in ("model", "trainer"):  # weights; optimiser moments, schedules, RNG states, data position
        ta, tb = _tensors(a[part]), _tensors(b[part])
        assert ta.keys() == tb.keys()
        differ = [k for k in ta if not (torch.equal(ta[k], tb[k]) if isinstance(ta[k], torch.Tensor) else ta[k] == tb[k])]
        assert not differ, f"{part}: {differ[:5]}"
    data = b["trainer"]["processes"][0]["data"]
    assert data["position"] == 8  # 4 iterations of 2 images


def test_metrics_lines_repair(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 0, "loss": 1}\nnot json\n{"iteration": 5, "loss": 2}\n{"iteration": 6, "lo')
    assert repair_json_lines(path, keep=lambda r: r["iteration"] < 5) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"iteration": 0, "loss": 1}]
    assert path.read_text().endswith("\n")
    assert repair_json_lines(tmp_path / "absent.json") == 0 and not (tmp_path / "absent.json").exists()

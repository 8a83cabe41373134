"""Checkpoints and weights: atomic writes, safe loading, refusal of files that would run code."""
import pickle

import numpy as np
import pytest
import torch

from lgd_cli.engine.checkpoint import SafeDetectionCheckpointer, check_pickle_weights, read_lgd_checkpoint
from lgd_cli.errors import CheckpointError


class _CreatesFile:
    """Unpickling this would create `path`: the classic malicious pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_msra_style_pkl_with_numpy_arrays_loads(tmp_path):
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"conv1_w": np.ones((2, 3, 1, 1), dtype=np.float32), "fc1000_b": np.zeros(3)}, f)
    model = torch.nn.Conv2d(3, 2, 1)
    data = SafeDetectionCheckpointer(model)._load_file(str(path))
    assert data["matching_heuristics"] and data["model"]["conv1_w"].shape == (2, 3, 1, 1)


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, suffix):
    victim = tmp_path / "pwned"
    weights = tmp_path / f"weights{suffix}"
    with open(weights, "wb") as f:
        pickle.dump({"model": {"w": _CreatesFile(victim)}}, f)
    with pytest.raises(CheckpointError, match="could run code"):
        if suffix == ".pkl":
            check_pickle_weights(weights)
        else:
            read_lgd_checkpoint(weights)
    with pytest.raises(CheckpointError):
        SafeDetectionCheckpointer(torch.nn.Linear(1, 1)).load(str(weights))
    assert not victim.exists()


def test_truncated_checkpoint_is_a_clear_error(trained_checkpoint, tmp_path):
    cut = tmp_path / "cut.pth"
    data = trained_checkpoint.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_lgd_checkpoint(cut)


def test_checkpoint_of_another_tool_is_named_as_such(tmp_path):
    plain = tmp_path / "torchvision.pth"
    torch.save({"conv.weight": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        read_lgd_checkpoint(plain)
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, plain)
    with pytest.raises(CheckpointError, match="not written by `lgd train`"):
        read_lgd_checkpoint(plain)


def test_lgd_checkpoint_loads_with_weights_only(trained_checkpoint):
    state = torch.load(trained_checkpoint, weights_only=True)  # raises if anything but plain data
    assert "MODEL" in state["lgd"]["config"] and state["lgd"]["preset"] == "demo"

"""Checkpoints and weights: atomic writes, safe loading, refusal of files that would run code."""
import errno
import pickle

import numpy as np
import pytest
import torch

from lgd_cli.engine.checkpoint import read_lgd_checkpoint
from lgd_cli.modeling.weight_files import SafeDetectionCheckpointer, check_pickle_weights
from lgd_cli.errors import CheckpointError

from tests.helpers import fill_disk_after


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


def _checkpointer(tiny_cfg, folder):
    from lgd_cli.engine.checkpoint import LGDCheckpointer

    return LGDCheckpointer(torch.nn.Linear(2, 2), str(folder), tiny_cfg)


@pytest.mark.parametrize("failure", ["oserror", "torch_zip_writer"])
def test_full_disk_names_path_and_cause_and_keeps_the_previous_checkpoint(tiny_cfg, tmp_path, monkeypatch, failure):
    checkpointer = _checkpointer(tiny_cfg, tmp_path)
    checkpointer.save("model_0000002")
    before = (tmp_path / "model_0000002.pth").read_bytes()
    save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        f.truncate(100)  # half written when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    if failure == "torch_zip_writer":  # the real path: torch's writer meets ENOSPC mid-file
        fill_disk_after(monkeypatch, torch)
    else:
        monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError) as info:
        checkpointer.save("model_0000005")
    assert info.value.message == f"could not write checkpoint {tmp_path / 'model_0000005.pth'}: No space left on device"
    assert "previous checkpoint is intact" in info.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000002.pth"]  # no temp file
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert (tmp_path / "model_0000002.pth").read_bytes() == before
    assert checkpointer.last_saved == str(tmp_path / "model_0000002.pth")
    monkeypatch.undo()
    assert _checkpointer(tiny_cfg, tmp_path).resume_path() == str(tmp_path / "model_0000002.pth")


def test_resume_skips_a_truncated_newest_checkpoint(tiny_cfg, tmp_path, caplog):
    import os

    checkpointer = _checkpointer(tiny_cfg, tmp_path)
    checkpointer.save("model_0000002")
    checkpointer.save("model_0000005")
    newest = tmp_path / "model_0000005.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    assert checkpointer.resume_path() == str(tmp_path / "model_0000002.pth")
    warned = [r.getMessage() for r in caplog.records if r.name == "lgd_cli" and r.levelname == "WARNING"]
    assert any(f"skipping {newest} is not a readable checkpoint" in m and "resuming from" in m for m in warned)
    (tmp_path / "model_0000002.pth").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        checkpointer.resume_path()
    message = info.value.message
    assert message.startswith(f"no readable checkpoint in {tmp_path} to resume from: ")
    assert f"{newest} is not a readable checkpoint" in message and f"{tmp_path / 'model_0000002.pth'} is not" in message
    assert "--force" in info.value.hint
    # A kill between a checkpoint's rename and the pointer's update: the newer file still counts.
    checkpointer.save("model_0000008")
    (tmp_path / "last_checkpoint").unlink()
    os.utime(tmp_path / "model_0000008.pth", (2e9, 2e9))
    assert checkpointer.resume_path() == str(tmp_path / "model_0000008.pth")


def test_rng_and_data_state_load_with_weights_only(tmp_path):
    import io
    import random

    from lgd_cli.rng import capture_rng_state, restore_rng_state

    buffer = io.BytesIO()
    torch.save({"rng": capture_rng_state()}, buffer)
    expected = random.random(), np.random.rand(), torch.rand(1)
    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_model_best_is_neither_pointed_at_nor_resumed_from(tiny_cfg, tmp_path):
    import os

    checkpointer = _checkpointer(tiny_cfg, tmp_path)
    checkpointer.save("model_0000002")
    checkpointer.save("model_best")  # BestCheckpointer's: an older state than the newest checkpoint
    os.utime(tmp_path / "model_best.pth", (2e9, 2e9))
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert checkpointer.last_saved == str(tmp_path / "model_0000002.pth")
    assert checkpointer.resume_path() == str(tmp_path / "model_0000002.pth")

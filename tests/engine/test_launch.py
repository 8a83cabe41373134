"""Multi-process launch: layouts checked up front, a failing process's own error reaches the user."""
import logging
import os
import signal

import pytest
import torch

from lgd_cli.engine import launch as launch_mod
from lgd_cli.engine.launch import check_processes, launch
from lgd_cli.errors import ConfigError, DataError, LGDError


def _data_error_on_rank_1():
    from detectron2.utils import comm

    if comm.get_rank() == 1:
        raise DataError("image b.png (image id 2 in ann.json) cannot be decoded", hint="pass --skip-bad-images")


def _killed_on_rank_1():
    from detectron2.utils import comm

    if comm.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_a_child_lgd_error_is_raised_as_itself_in_the_parent():
    with pytest.raises(DataError) as info:
        launch(_data_error_on_rank_1, 2, use_cuda=False)
    assert info.value.message == "process 1: image b.png (image id 2 in ann.json) cannot be decoded"
    assert info.value.hint == "pass --skip-bad-images" and info.value.exit_code == 1


@pytest.mark.slow
def test_a_child_killed_by_a_signal_is_named_with_exit_code_128_plus_signal():
    with pytest.raises(LGDError) as info:
        launch(_killed_on_rank_1, 2, use_cuda=False)
    assert info.value.message == "training process 1 was killed by SIGKILL"
    assert info.value.exit_code == 137 and "out-of-memory" in info.value.hint


def test_an_unexpected_child_exception_gives_its_last_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lgd_cli")
    trace = "\n\n-- Process 0 terminated with the following error:\nTraceback (most recent call last):\n  ...\nValueError: boom\n"
    error = launch_mod._raised_error(tmp_path, 0, trace)
    assert error.message == "training process 0 failed: ValueError: boom" and "--debug" in error.hint
    caplog.set_level(logging.DEBUG, logger="lgd_cli")  # lgd --debug
    assert "Traceback" in launch_mod._raised_error(tmp_path, 0, trace).message
    assert launch_mod._exited_error(1, 3).message == "training process 1 exited with code 3"


def test_more_gpus_than_devices_is_refused_only_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="--gpus 2 asked for, but only 1 CUDA device is visible"):
        check_processes(2, use_cuda=True)
    check_processes(2, use_cuda=False)  # CPU processes on gloo: a debugging mode
    with pytest.raises(ConfigError, match="do not fit"):
        check_processes(0, use_cuda=False)

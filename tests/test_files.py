"""lgd_cli/files.py: strict JSON written atomically; errors.user_error: what an entry point reports."""
from __future__ import annotations

import errno
import json
import math

import pytest

from lgd_cli.errors import DataError, user_error
from lgd_cli.files import atomic_write_json


def test_atomic_write_json_writes_strict_json_with_nan_and_inf_as_null(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"AP": math.nan, "rows": [1.5, math.inf, (-math.inf, 2)], "name": "x"})
    text = path.read_text()
    record = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))
    assert record == {"AP": None, "rows": [1.5, None, [None, 2]], "name": "x"}
    assert text.startswith('{\n "AP"')  # indent=1, the files' format
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no staged file left behind


def test_atomic_write_json_keeps_the_old_file_when_encoding_fails(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"not json": object()})
    assert json.loads(path.read_text()) == {"ok": 1}


def test_user_error_reports_lgd_errors_interrupts_and_os_errors(monkeypatch):
    monkeypatch.delenv("LGD_DEBUG", raising=False)
    data = DataError("bad file", hint="fix it")
    assert user_error(data, interrupted_hint="h") is data
    interrupted = user_error(KeyboardInterrupt(), interrupted_hint="resume it")
    assert (interrupted.message, interrupted.hint, interrupted.exit_code) == ("interrupted", "resume it", 130)
    full = user_error(OSError(errno.ENOSPC, "No space left on device", "/x/y.pth"), interrupted_hint="h")
    assert (full.message, full.exit_code) == ("/x/y.pth: No space left on device", 1)
    assert user_error(ValueError("a bug"), interrupted_hint="h") is None  # a traceback, not a message
    monkeypatch.setenv("LGD_DEBUG", "1")
    assert user_error(data, interrupted_hint="h") is None
    assert user_error(KeyboardInterrupt(), interrupted_hint="h").exit_code == 130

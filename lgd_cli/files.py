"""Writing files so that nothing is ever half-written: a temp file beside the target, then a rename."""
from __future__ import annotations

import contextlib
import json
import os
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def default_mode() -> int:
    """The permissions a plain open() gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def staged_path(target: Path) -> Iterator[Path]:
    """Yield a temp path in `target`'s folder; rename it over `target` only if the block succeeds.

    On any exception (a failed check, a full disk, Ctrl-C) the temp file is removed and an
    existing `target` is left as it was.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    staged = Path(name)
    try:
        os.chmod(staged, default_mode())  # mkstemp makes it private
        yield staged
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, write: Callable) -> None:
    """Write through `write(fileobj)` into a staged file, fsync it, then rename it over `path`."""
    with staged_path(path) as staged, open(staged, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN and infinity, however deeply nested, replaced by None.

    COCOeval reports NaN where there is nothing to score (e.g. no large objects); strict JSON
    parsers (JavaScript's, jq's) reject the NaN that Python's json writes by default.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def json_text(obj: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """Strict JSON of `obj`: NaN and infinities become null."""
    return json.dumps(finite_or_null(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    """Write `obj` as strict JSON (see `json_text`) through `atomic_write_bytes`."""
    data = json_text(obj, indent=indent, sort_keys=sort_keys).encode()
    atomic_write_bytes(path, lambda f: f.write(data))


@contextlib.contextmanager
def failed_writes_name(path: Path) -> Iterator[None]:
    """Re-raise a write that fails inside the block as an OSError naming `path`.

    torch's zip writer (torch.save, torch.jit.save into a file object) reports a failed write, e.g.
    a full disk, as a RuntimeError raised while it closes the archive, with the OSError, which names
    no file, only as that error's context.
    """
    try:
        yield
    except RuntimeError as exc:
        cause = exc.__context__
        if not isinstance(cause, OSError):
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


def atomic_torch_save(obj, path: Path) -> None:
    """`torch.save` through `atomic_write_bytes`; a failed write raises an OSError naming `path`."""
    import torch

    with failed_writes_name(path):
        atomic_write_bytes(path, lambda f: torch.save(obj, f))


def repair_json_lines(path: Path, keep: Callable[[dict], bool] = lambda record: True) -> int:
    """Rewrite a JSON-lines file without its torn or unparsable lines and the records `keep` rejects;
    returns how many lines were dropped. A missing file is left missing.

    An append-only log such as detectron2's metrics.json can end in half a line after a kill. The
    file is rewritten in place (what is kept is usually a prefix: only a truncation), so a handle
    already open for appending keeps appending to it.
    """
    path = Path(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return 0
    kept, dropped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and keep(record):
            kept.append(line)
        else:
            dropped += 1
    if dropped or (lines and lines[-1].strip()):  # also when the last line lacks its newline
        with open(path, "r+b") as f:
            f.write(b"".join(line + b"\n" for line in kept))
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    return dropped


def read_metrics(path: Path) -> list[dict]:
    """metrics.json rows (one JSON object per line), the last row per iteration winning.

    A resumed run appends the iterations after its checkpoint again, and a killed one may end
    in a cut line: both are handled here.
    """
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "iteration" in row:
            rows.setdefault(row["iteration"], {}).update(row)
    return [rows[k] for k in sorted(rows)]

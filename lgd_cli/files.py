"""Writing files so that nothing is ever half-written: a temp file beside the target, then a rename."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


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

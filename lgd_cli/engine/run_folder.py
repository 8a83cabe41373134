"""What a run folder holds, and the rules for starting, resuming or replacing a run in one."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import time
import zipfile
from pathlib import Path

from lgd_cli.errors import ConfigError, LGDError, RunFinished

# What a run folder holds; `--force` removes exactly these, nothing else of the user's.
RUN_FILES = ("last_checkpoint", "config.yaml", "metrics.json", "summary.json", "log.txt")
RUN_GLOBS = ("model_*.pth", "events.out.tfevents.*", ".*.tmp", "log.txt.rank*")
# Held (flock) by the process that trains into the folder; not part of the run, so never cleared.
LOCK_FILE = ".lgd.lock"


def holds_run(output: Path) -> bool:
    return any((output / name).exists() for name in ("last_checkpoint", "config.yaml", "metrics.json"))


def clear_run(output: Path) -> None:
    for name in RUN_FILES:
        (output / name).unlink(missing_ok=True)
    for pattern in RUN_GLOBS:
        for path in output.glob(pattern):
            path.unlink()
    for folder in ("eval", "eval-teacher"):
        shutil.rmtree(output / folder, ignore_errors=True)


def finished_iterations(output: Path, max_iter: int) -> int | None:
    """The iterations of the finished run in `output` when there is nothing left to train to `max_iter`
    (its summary.json and a complete model_final.pth written, at `max_iter` or beyond), else None."""
    try:
        summary = json.loads((output / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    done = summary.get("iterations") if isinstance(summary, dict) else None
    # A truncated model_final (its zip directory is at the end) is no finished run: resume falls back.
    if not isinstance(done, int) or done < max_iter or not zipfile.is_zipfile(output / "model_final.pth"):
        return None
    return done


def check_resumable(output: Path) -> None:
    """Refuse to resume (ConfigError) where there is no run to continue."""
    if not holds_run(output):
        where = "does not exist" if not output.exists() else "holds no run (no config.yaml, no checkpoint)"
        raise ConfigError(f"--resume: {output} {where}, so there is nothing to continue",
                          hint="check --output; without --resume a new run starts there")


def prepare_output(output: Path, resume: bool, force: bool, *, max_iter: int | None = None) -> None:
    """Check that a run may start (or continue) in `output`, clearing it for `force`; create it.

    Args:
        max_iter: with `resume`, a run already trained this far raises RunFinished (nothing to do).
    """
    if resume and force:
        raise ConfigError("--resume and --force contradict each other: continue the run, or start afresh")
    if resume and max_iter is not None:
        done = finished_iterations(output, max_iter)
        if done is not None:
            raise RunFinished(f"{output} already finished at iteration {done}; nothing to do",
                              hint=f"evaluate it: lgd eval {output}; train it further with a larger --iters "
                                   "and --resume")
    if holds_run(output):
        if force:
            clear_run(output)
        elif not resume:
            raise ConfigError(f"{output} already holds a training run",
                              hint="add --resume to continue it, or --force to start afresh (deletes its checkpoints)")
    output.mkdir(parents=True, exist_ok=True)


# Lock descriptors this process holds: a forked child (a data-loader worker) closes its copies, so
# that only the training process itself keeps the folder locked, and its death frees it at once.
_held: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunFolderLock:
    """An exclusive OS lock (flock) on `<output>/.lgd.lock`: one training process per run folder.

    The kernel releases it when the holder exits, however it dies (kill -9 included), so it never
    goes stale. The file names its holder (pid, host, start time, command) for the refusal message.
    Descriptors are not inherited by exec'd processes (Python opens them close-on-exec).
    """

    def __init__(self, output: Path):
        self.output = Path(output)
        self.path = self.output / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (creating the folder) or raise an LGDError naming the process that holds it."""
        while True:
            self.output.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode("utf-8", "replace")
                os.close(fd)
                raise LGDError(f"{self.output} is in use by another training run: {_describe(holder)}",
                               hint="wait for it to end, or stop it; a run that died frees the folder by itself "
                                    "(--force does not take a live run's folder)") from None
            # A holder that removed the file (its fresh folder failed) before we locked: lock the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": shlex.join(getattr(sys, "orig_argv", sys.argv))}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        _held.add(fd)

    def release(self, remove: bool = False) -> None:
        """Free the lock; `remove` deletes the lock file first (a fresh folder being removed)."""
        if self.fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        _held.discard(self.fd)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunFolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(holder: str) -> str:
    try:
        record = json.loads(holder)
        return (f"pid {record['pid']} on {record['host']}, started {record['started']}: "
                f"{record['command']}")
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


"""The one error family lgd raises for problems a user can fix, and what a process reports on exit.

Only the processes' entry points catch it: cli.main and the comparison worker (compare/worker.py).
"""
from __future__ import annotations

import os

INTERRUPTED_EXIT_CODE = 130  # the shell's status of a process ended by Ctrl-C (128 + SIGINT)


class LGDError(Exception):
    """A problem with the user's input, data, files or environment.

    Args:
        message: what is wrong, naming the file/record/key concerned.
        hint: what to do about it (optional, shown on its own line).
        exit_code: process exit status the CLI uses (1 = bad input or failed check).
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(LGDError):
    """Unknown preset or config key, wrong value type, bad option: a usage error."""

    exit_code = 2


class DataError(LGDError):
    """A dataset file (annotations or images) that cannot be used as given."""


class CheckpointError(LGDError):
    """A checkpoint or weights file that is missing, truncated or not ours."""


class RunFinished(LGDError):
    """A request that is already satisfied (`--resume` of a finished run): a note, exit status 0.

    An exception, so that it stops the command on every machine of a multi-machine job as a failure
    would; the CLI prints it without `error:`.
    """

    exit_code = 0


def user_error(exc: BaseException, *, interrupted_hint: str) -> LGDError | None:
    """What an entry point reports for `exc` and exits with, or None to let it raise (a bug).

    An LGDError as it is; Ctrl-C as "interrupted" with `interrupted_hint`; an OSError that no
    caller explained (a full disk, permissions) naming its file and cause instead of a traceback.
    With LGD_DEBUG=1, LGDErrors and OSErrors are raised with their tracebacks.
    """
    if isinstance(exc, KeyboardInterrupt):
        return LGDError("interrupted", interrupted_hint, exit_code=INTERRUPTED_EXIT_CODE)
    if os.environ.get("LGD_DEBUG") == "1":
        return None
    if isinstance(exc, LGDError):
        return exc
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return LGDError(f"{where}{exc.strerror or exc}", "LGD_DEBUG=1 shows where it happened")
    return None

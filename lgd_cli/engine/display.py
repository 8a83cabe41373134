"""What an engine is handed to show how far it got, since it draws nothing itself (the CLI does).

lgd_cli/console.py's TerminalDisplay is the CLI's; None everywhere means: show nothing, log only.
"""
from __future__ import annotations

from typing import Protocol


class ProgressBars(Protocol):
    """The part of rich.progress.Progress an engine uses (a context manager; start/stop)."""

    def add_task(self, description: str, *, total: int, completed: int = 0, detail: str = "") -> int: ...

    def update(self, task: int, *, completed: int | None = None, detail: str | None = None) -> None: ...

    def advance(self, task: int) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Display(Protocol):
    """Where progress goes; picklable, so that it reaches spawned training processes."""

    def progress(self) -> ProgressBars | None:
        """Fresh progress bars, or None where nothing can be drawn (stdout is a file): the log tells then."""

    def join_process(self) -> None:
        """Called first in a spawned main training process: its `lgd_cli` log goes where the CLI's goes."""

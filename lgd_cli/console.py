"""The one rich Console of lgd, plus the renderers for errors, tables and progress, and where logs go.

Only the CLI layer imports this module: the engines log through `logging` ("lgd_cli" logger) and draw
progress through the `Display` they are handed (lgd_cli/engine/display.py); TerminalDisplay is it.
"""
from __future__ import annotations

import logging
import sys
from typing import Iterable, Mapping, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def print_error(message: str, hint: str | None = None) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if hint:
        err_console.print(f"[yellow]hint:[/] {hint}", highlight=False, soft_wrap=True)


def print_warning(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> Table:
    out = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        out.add_column(name, no_wrap=i == 0)  # the first column names things: never cut or wrap it
    for row in rows:
        out.add_row(*[_fmt(v) for v in row])
    return out


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"  # detectron2 reports NaN where COCOeval has nothing to score (e.g. no large objects)
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def metrics_table(title: str, metrics: Mapping[str, float]) -> Table:
    return table(title, ["metric", "value"], metrics.items())


def task_progress() -> Progress:
    """Progress bars of training, evaluation or a comparison: done M/N, elapsed, ETA and a `detail` text."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        transient=False,
    )


# The logger of the periodic training lines (lgd_cli/engine/logs.py): they repeat what the progress
# bar shows, so a terminal does not print them; a file or pipe gets them.
PERIODIC_LOGGER = "lgd_cli.periodic"
_HANDLER_TAG = "_lgd_console"


class _LevelBelow(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record):
        return record.levelno < self.level


class _StdStream(logging.StreamHandler):
    """A StreamHandler on whatever sys.stdout or sys.stderr is when it writes (test runners swap them)."""

    def __init__(self, name: str):
        self._std_name = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._std_name)

    @stream.setter
    def stream(self, value):
        pass


class _NotPeriodic(logging.Filter):
    def filter(self, record):
        return record.name != PERIODIC_LOGGER


def setup_logging() -> None:
    """Route the "lgd_cli" logger to this process's terminal or pipes (idempotent).

    Warnings go to stderr (rich's RichHandler on a terminal, plain lines otherwise). Infos (the run's
    banner, periodic lines) go to stderr as well on a terminal, without the periodic lines the progress
    bar shows; to stdout, one plain line each, when stdout is a file or pipe (`lgd train > run.log`).
    """
    from rich.logging import RichHandler

    logger = logging.getLogger("lgd_cli")
    for old in [h for h in logger.handlers if getattr(h, _HANDLER_TAG, False)]:
        logger.removeHandler(old)
    handlers = []
    if err_console.is_terminal:
        err = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
        err.setLevel(logging.INFO if console.is_terminal else logging.WARNING)
        err.addFilter(_NotPeriodic())
    else:
        err = _StdStream("stderr")
        err.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        err.setLevel(logging.WARNING)
    handlers.append(err)
    if not console.is_terminal:
        out = _StdStream("stdout")
        out.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%m/%d %H:%M:%S"))
        out.setLevel(logging.INFO)
        out.addFilter(_LevelBelow(logging.WARNING))  # warnings are on stderr already
        handlers.append(out)
    for handler in handlers:
        setattr(handler, _HANDLER_TAG, True)
        logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


class TerminalDisplay:
    """The CLI's Display (lgd_cli/engine/display.py): rich progress bars on a terminal, none otherwise.

    Plain state only, so that it travels (pickled) into spawned training processes.
    """

    def progress(self) -> Progress | None:
        return task_progress() if console.is_terminal else None

    def join_process(self) -> None:
        setup_logging()

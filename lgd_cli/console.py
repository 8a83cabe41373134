"""The one rich Console of lgd, plus the renderers for errors, tables and progress."""
from __future__ import annotations

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
    if isinstance(value, float) and value != value:
        return "n/a"  # detectron2 reports NaN where COCOeval has nothing to score (e.g. no large objects)
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def metrics_table(title: str, metrics: Mapping[str, float]) -> Table:
    return table(title, ["metric", "value"], metrics.items())


def training_progress() -> Progress:
    """Progress bar for training: iteration M/N, ETA and a free-text loss field."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"),
        console=console,
        transient=False,
    )

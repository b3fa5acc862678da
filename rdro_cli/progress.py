"""One look for every stage's progress bar (stderr, so stdout stays clean for scripts)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def task_progress(*extra_fields: str) -> Progress:
    """A rich progress bar; `extra_fields` are task fields shown after the bar (e.g. 'rate')."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *(TextColumn(f"{{task.fields[{name}]}}") for name in extra_fields),
    ]
    return Progress(*columns, console=console, transient=False, refresh_per_second=4)

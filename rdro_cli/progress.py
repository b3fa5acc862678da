"""One look for every stage's progress, on stderr so stdout stays clean for scripts.

In a terminal: rich progress bars. Anywhere else (a log file, `nohup`, CI, a cluster job) a bar would
show nothing until the end, so progress is one plain line per task every `RDRO_PROGRESS_EVERY` seconds
(default 10), when a task starts and when it ends: done/total, rate, elapsed, ETA and the task's fields
(e.g. the loss for train).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

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
if not console.is_terminal:  # a log has no width: never cut tables or messages at 80 columns
    console = Console(stderr=True, width=max(console.width, 1000))


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class PlainTask:
    id: int
    description: str
    total: float | None
    completed: float
    fields: dict
    started: float = field(default_factory=lambda: time.monotonic())
    first: float = 0.0  # `completed` when the task was added (a resumed run starts past 0)
    printed: float = 0.0  # when the last line was printed
    finished: bool = False


class PlainProgress:
    """The part of `rich.progress.Progress` the stages use, writing one line per interval instead of a bar."""

    def __init__(self, fields: tuple[str, ...], every: float) -> None:
        self.fields, self.every, self.tasks, self.disable = fields, every, [], False

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        for task in self.tasks:
            if not task.finished and exc[0] is None:
                self._line(task)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        task = PlainTask(len(self.tasks), description, total, completed, fields, first=completed)
        self.tasks.append(task)
        self._line(task)
        return task.id

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None, description: str | None = None, **fields) -> None:
        task = self.tasks[task_id]
        if completed is not None:
            task.completed = completed
        if advance:
            task.completed += advance
        if total is not None:
            task.total = total
        if description is not None:
            task.description = description
        task.fields.update(fields)
        done = task.total is not None and task.completed >= task.total
        if done or time.monotonic() - task.printed >= self.every:
            self._line(task)
            task.finished = done

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _line(self, task: PlainTask) -> None:
        task.printed = now = time.monotonic()
        if self.disable:
            return
        elapsed = now - task.started
        rate = (task.completed - task.first) / elapsed if elapsed > 0 else 0.0
        parts = [f"{task.description}:"]
        if task.total:
            parts.append(f"{task.completed:.0f}/{task.total:.0f} ({100 * task.completed / task.total:.1f}%)")
        else:
            parts.append(f"{task.completed:.0f}")
        parts.append(f"{rate:.2f}/s elapsed {_clock(elapsed)}")
        if task.total and rate > 0:
            parts.append(f"eta {_clock((task.total - task.completed) / rate)}")
        parts += [str(task.fields[name]) for name in self.fields if task.fields.get(name)]
        console.print(" ".join(parts), soft_wrap=True, highlight=False, markup=False)


def status(message: str):
    """A spinner in a terminal; in a log, the message as one line (a spinner there shows nothing)."""
    if console.is_terminal:
        return console.status(message)
    console.print(message, soft_wrap=True, highlight=False, markup=False)
    return contextlib.nullcontext()


def task_progress(*extra_fields: str) -> Progress | PlainProgress:
    """A progress display; `extra_fields` are task fields shown after the bar (e.g. 'rate')."""
    if not console.is_terminal:
        return PlainProgress(extra_fields, float(os.environ.get("RDRO_PROGRESS_EVERY", "10")))
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *(TextColumn(f"{{task.fields[{name}]}}") for name in extra_fields),
    ]
    return Progress(*columns, console=console, transient=False, refresh_per_second=4)

"""Progress of long commands, one helper for all of them: a move's steps and tables,
and counted work (shards migrated or measured, planned moves applied) with its rate
and the time left.

Drawn on a terminal only, and never with ``--json``: a pipe or a file gets the
command's result and nothing else (:func:`shows_progress`). Nothing is drawn until
there is something to show, so a command refused at once prints its one error line
and no empty display first.
"""

from __future__ import annotations

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["Counted", "Display", "shows_progress"]


def shows_progress(console: Console, as_json: bool) -> bool:
    """Whether a command draws progress: on a terminal, without ``--json``."""
    return not as_json and console.is_terminal


def _counted(task: Task) -> bool:
    return task.total is not None and "unit" in task.fields


class _Bar(ProgressColumn):
    """The bar of a counted task; nothing on a step line."""

    def __init__(self) -> None:
        super().__init__()
        self._bar = BarColumn(bar_width=24)

    def render(self, task: Task) -> RenderableType:
        return self._bar.render(task) if _counted(task) else Text("")


class _Count(ProgressColumn):
    """``done/total unit``, the rate and the time left of a counted task."""

    def __init__(self) -> None:
        super().__init__()
        self._left = TimeRemainingColumn()

    def render(self, task: Task) -> RenderableType:
        if not _counted(task):
            return Text("")
        unit = task.fields["unit"]
        rate = task.speed
        text = Text(f"{int(task.completed):,}/{int(task.total or 0):,} {unit}")
        if rate:
            text.append(f"  {rate:,.2f} {unit}/s")
        if task.completed < (task.total or 0):
            text.append("  left ")
            text.append_text(self._left.render(task))
        return text


class Counted:
    """One counted task of a :class:`Display`."""

    def __init__(self, display: Display, task: TaskID | None) -> None:
        self._display = display
        self._task = task

    def advance(self, amount: float = 1, detail: str | None = None) -> None:
        """*amount* more done; *detail* replaces the line's note (the last item, say)."""
        if self._task is not None:
            self._display.progress.update(self._task, advance=amount)
            if detail is not None:
                self._display.progress.update(self._task, detail=detail)


class Display:
    """A command's progress display: step lines and counted tasks (see the module)."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            _Bar(),
            _Count(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
        )
        self._started = False

    def __enter__(self) -> Display:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self.progress.__exit__(None, None, None)

    def _start(self) -> None:
        if self.enabled and not self._started:
            self._started = True
            self.progress.__enter__()

    def line(self, description: str, detail: str = "") -> TaskID:
        """A new step line (a spinner, no total)."""
        self._start()
        return self.progress.add_task(description, detail=detail, total=None)

    def finish(self, task: TaskID) -> None:
        """Mark a step line done."""
        self.progress.update(task, completed=1, total=1)

    def update(self, task: TaskID, detail: str) -> None:
        """Change a line's note."""
        self.progress.update(task, detail=detail)

    def counter(self, description: str, total: float, unit: str) -> Counted:
        """A counted task of *total* *unit* (shards, moves, ...); nothing is drawn for
        none."""
        if not self.enabled or total <= 0:
            return Counted(self, None)
        self._start()
        return Counted(self, self.progress.add_task(description, detail="", total=total, unit=unit))

    def note(self, message: str) -> None:
        """Print a line above the display (or alone, when nothing is drawn)."""
        if self._started:
            self.progress.console.print(message)
        else:
            self.console.print(message)

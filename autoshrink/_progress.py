"""Progress bars: one rich bar (:class:`Bar`) for every long loop (teacher training, sensitivity,
the search), and the search's view on top of it (:class:`ProgressView`: trials done / total, ETA,
best feasible so far, one printed line per finished trial).

rich is imported only when a bar is shown.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from autoshrink.budget import Budget
from autoshrink.record import State

__all__ = ["PLAIN_EVERY_S", "Bar", "ProgressView"]

#: without a terminal, a plain progress line at least this often (seconds)
PLAIN_EVERY_S = 30.0


class Bar:
    """``label ━━━━━━ 3/10 unit · ETA 0:00:12 · extra``, or nothing at all when not ``enabled``.

    Args:
        label: what the loop does (shown bold at the left).
        total: steps in all; ``completed``: steps already done.
        unit: what a step is (``"trials"``, ``"steps"``), after the count.
        extra: a rich column template after the ETA, naming ``fields`` (``"· loss {task.fields[loss]}"``).
        fields: the fields' first values.
        console: a :class:`rich.console.Console` (default: rich's, on stdout).
        enabled: False makes every method a no-op (``--no-progress``, tests, workers).

    Example:
        >>> with Bar("training", 3, unit="steps", enabled=False) as bar:
        ...     bar.advance()
    """

    def __init__(self, label: str, total: int, *, completed: int = 0, unit: str = "", extra: str | None = None,
                 fields: Mapping[str, Any] | None = None, console: Any = None, enabled: bool = True,
                 plain: bool | None = None, every_s: float = PLAIN_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.progress = None
        self.plain: _PlainLines | None = None
        if not enabled:
            return
        if plain is None:  # not a terminal (a log file, CI, nohup): a live bar would print nothing until the end
            plain = not getattr(console, "is_terminal", sys.stdout.isatty())
        if plain:
            self.plain = _PlainLines(label, total, completed, unit, extra, dict(fields or {}), console, every_s, clock)
            self.task = 0
            return
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn(f"[bold]{escape(label)}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn(f"{unit} · ETA" if unit else "· ETA"), TimeRemainingColumn()]
        if extra:
            columns.append(TextColumn(extra))
        self.progress = Progress(*columns, console=console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(label, total=total, completed=completed, **dict(fields or {}))

    @property
    def completed(self) -> float:
        if self.plain is not None:
            return self.plain.completed
        return self.progress.tasks[0].completed if self.progress is not None else 0

    def advance(self, steps: int = 1, **fields: Any) -> None:
        """``steps`` more done; ``fields`` update the ``extra`` column."""
        if self.plain is not None:
            self.plain.update(self.plain.completed + steps, fields)
        elif self.progress is not None:
            self.progress.update(self.task, advance=steps, **fields)

    def update(self, *, completed: int | None = None, **fields: Any) -> None:
        """Set the count done (when given) and the ``extra`` fields."""
        if self.plain is not None:
            self.plain.update(self.plain.completed if completed is None else completed, fields)
        elif self.progress is not None:
            if completed is not None:
                fields["completed"] = completed
            self.progress.update(self.task, **fields)

    def tick(self) -> None:
        """Nothing new, but time passed: without a terminal, a plain line once ``every_s`` is due
        (a long step, a trial that runs for minutes, still shows the run is alive)."""
        if self.plain is not None:
            self.plain.update(self.plain.completed, {})

    def print(self, text: str) -> None:
        """A line above the bar (kept in a log)."""
        if self.plain is not None:
            self.plain.console.print(text)
        elif self.progress is not None:
            self.progress.console.print(text)

    def close(self) -> None:
        if self.plain is not None:
            self.plain.line()
            self.plain = None
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PlainLines:
    """Without a terminal: ``label: 3/10 unit · 0:01:05 elapsed · extra`` as plain lines, the first
    at once and then whenever ``every_s`` has passed since the last one (and a last one at the end)."""

    def __init__(self, label: str, total: int, completed: int, unit: str, extra: str | None,
                 fields: dict, console: Any, every_s: float, clock: Callable[[], float]) -> None:
        from rich.console import Console

        self.label, self.total, self.completed, self.unit = label, total, completed, unit
        self.extra, self.fields = extra, fields
        self.console = console if console is not None else Console(highlight=False)
        self.every_s, self.clock = every_s, clock
        self.start = self.last = clock()
        self.line()

    def update(self, completed: float, fields: Mapping[str, Any]) -> None:
        self.completed = completed
        self.fields.update(fields)
        if self.clock() - self.last >= self.every_s:
            self.line()

    def line(self) -> None:
        now = self.clock()
        self.last = now
        elapsed = int(now - self.start)
        text = (f"{self.label}: {self.completed:g}/{self.total}{' ' + self.unit if self.unit else ''} · "
                f"{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d} elapsed")
        if self.extra:
            class _Task:  # the rich template names ``task.fields[...]``
                fields = self.fields

            try:
                text += " " + self.extra.format(task=_Task)
            except (KeyError, IndexError, AttributeError):
                pass
        self.console.print(text, markup=False, highlight=False)


class ProgressView:
    """A rich progress bar plus one printed line per finished trial (so a log keeps them)."""

    def __init__(self, total: int, done: int, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.best: tuple[float, float, int] | None = None  # accuracy, latency, number
        self.bar: Bar | None = None
        if not enabled:
            return
        from rich.console import Console

        self.bar = Bar("search", total, completed=done, unit="trials", extra="· best feasible: {task.fields[best]}",
                       fields={"best": "none yet"}, console=Console(stderr=False, file=sys.stdout))

    def started(self, number: int, candidate) -> None:
        if self.bar is not None:
            self.bar.print(f"[dim]trial {number}: {candidate.summary()}[/dim]")

    def finished(self, number: int, m: dict, budget: Budget, *, done: int | None = None) -> None:
        """Print trial ``number``'s outcome; ``done``: trials that now count towards the total
        (an over-budget candidate may not count), default one more than before."""
        state = m.get("state", State.FAIL)
        acc, lat = m.get("accuracy"), m.get("latency_ms")
        feasible = m.get("meets_budget")
        if state == State.COMPLETE and feasible and acc is not None:
            if self.best is None or acc > self.best[0]:
                self.best = (acc, lat, number)
        if self.bar is None:
            return
        counted = done is None or done > self.bar.completed
        lat_s = f"{lat:.2f} ms" if lat is not None else "- ms"
        size = m.get("size_mb")
        size_s = f"{size:.2f} MB" if size is not None else "- MB"
        if state == State.FAIL:
            line = f"[red]trial {number} FAILED[/red]: {m.get('error')}"
        elif state == State.PRUNED:
            line = f"[yellow]trial {number} stopped early[/yellow] (dominated mid-fine-tune) · {lat_s}"
        elif not feasible:
            over = budget.violations({k: m[k] for k in ("latency_ms", "size_mb", "mmacs") if m.get(k) is not None})
            why = ", ".join(f"{k} +{v:.0%}" for k, v in over.items())
            line = (f"[dim]trial {number} misses the budget ({why}): {lat_s}, {size_s}; not fine-tuned"
                    f"{'' if counted else ', not counted'}[/dim]")
        else:
            line = (f"[green]trial {number}[/green]: accuracy {acc:.2f} % · {lat_s} · {size_s} · "
                    f"fine-tune {m.get('finetune_s', 0):.0f} s")
        self.bar.print(line)
        best = "none yet" if self.best is None else f"#{self.best[2]} {self.best[0]:.2f} % @ {self.best[1]:.2f} ms"
        if done is None:
            self.bar.advance(best=best)
        else:
            self.bar.update(completed=done, best=best)

    def tick(self) -> None:
        """Time passed with no trial finished (see :meth:`Bar.tick`)."""
        if self.bar is not None:
            self.bar.tick()

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.print(f"[bold yellow]{text}[/bold yellow]")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

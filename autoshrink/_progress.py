"""The search's progress line: trials done / total, ETA, best feasible so far."""

from __future__ import annotations

import sys

from autoshrink.budget import Budget

__all__ = ["ProgressView"]


class ProgressView:
    """A rich progress bar plus one printed line per finished trial (so a log keeps them)."""

    def __init__(self, total: int, done: int, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.best: tuple[float, float, int] | None = None  # accuracy, latency, number
        self.progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=False, file=sys.stdout)
        self.progress = Progress(
            TextColumn("[bold]search"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("trials · ETA"),
            TimeRemainingColumn(),
            TextColumn("· best feasible: {task.fields[best]}"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("search", total=total, completed=done, best="none yet")

    def started(self, number: int, candidate) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[dim]trial {number}: {candidate.summary()}[/dim]")

    def finished(self, number: int, m: dict, budget: Budget, *, done: int | None = None) -> None:
        """Print trial ``number``'s outcome; ``done``: trials that now count towards the total
        (an over-budget candidate may not count), default one more than before."""
        state = m.get("state", "FAIL")
        acc, lat = m.get("accuracy"), m.get("latency_ms")
        feasible = m.get("meets_budget")
        if state == "COMPLETE" and feasible and acc is not None:
            if self.best is None or acc > self.best[0]:
                self.best = (acc, lat, number)
        if self.progress is None:
            return
        counted = done is None or done > self.progress.tasks[0].completed
        lat_s = f"{lat:.2f} ms" if lat is not None else "- ms"
        size = m.get("size_mb")
        size_s = f"{size:.2f} MB" if size is not None else "- MB"
        if state == "FAIL":
            line = f"[red]trial {number} FAILED[/red]: {m.get('error')}"
        elif state == "PRUNED":
            line = f"[yellow]trial {number} stopped early[/yellow] (dominated mid-fine-tune) · {lat_s}"
        elif not feasible:
            over = budget.violations({k: m[k] for k in ("latency_ms", "size_mb", "mmacs") if m.get(k) is not None})
            why = ", ".join(f"{k} +{v:.0%}" for k, v in over.items())
            line = (f"[dim]trial {number} misses the budget ({why}): {lat_s}, {size_s}; not fine-tuned"
                    f"{'' if counted else ', not counted'}[/dim]")
        else:
            line = (f"[green]trial {number}[/green]: accuracy {acc:.2f} % · {lat_s} · {size_s} · "
                    f"fine-tune {m.get('finetune_s', 0):.0f} s")
        self.progress.console.print(line)
        best = "none yet" if self.best is None else f"#{self.best[2]} {self.best[0]:.2f} % @ {self.best[1]:.2f} ms"
        if done is None:
            self.progress.update(self.task, advance=1, best=best)
        else:
            self.progress.update(self.task, completed=done, best=best)

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[bold yellow]{text}[/bold yellow]")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

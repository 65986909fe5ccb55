"""Early stopping: the ``Rungs`` rule, run as one Ray actor shared by all trials of a search."""

from __future__ import annotations

__all__ = ["Rungs"]


class Rungs:
    """Multi-objective early stopping (a Ray actor shared by all trials of a search).

    At each reporting step (a rung), a trial is stopped when another trial at the same rung
    dominates it clearly: at least ``margin`` points more accurate *and* no slower. Such a trial
    cannot reach the accuracy–latency front unless it gains more than the margin on its rival in
    the rest of its fine-tune, which short KD fine-tunes rarely do. Unlike single-objective ASHA,
    a fast, less accurate trial is never stopped for being less accurate than a slow one.

    A rung is a step *of one schedule* (the fine-tune's total length): with a cosine learning
    rate, a short fine-tune at step 80 has annealed further than a long one at step 80, so
    comparing them would stop long fine-tunes for being early in their schedule. A latency
    that is unknown on one side only never counts as "no slower".
    """

    def __init__(self, margin: float = 3.0, min_peers: int = 1) -> None:
        self.margin = margin
        self.min_peers = min_peers
        # (schedule, step) -> trial number -> (accuracy, latency_ms)
        self.reports: dict[tuple[int | None, int], dict[int, tuple[float, float | None]]] = {}

    def report(self, number: int, step: int, accuracy: float, latency_ms: float | None,
               schedule: int | None = None) -> bool:
        """Record a trial's accuracy at ``step`` of a ``schedule``-step fine-tune; True: stop it."""
        peers = self.reports.setdefault((schedule, step), {})
        peers[number] = (accuracy, latency_ms)
        others = [v for n, v in peers.items() if n != number]
        if len(others) < self.min_peers:
            return False
        for acc, lat in others:
            if latency_ms is None or lat is None:
                no_slower = latency_ms is None and lat is None
            else:
                no_slower = lat <= latency_ms
            if acc >= accuracy + self.margin and no_slower:
                return True
        return False

    def seed(self, history: dict[int, list[tuple]]) -> None:
        """Load reports of trials from an earlier session of the same study (resume): for each
        trial number, rows ``(step, accuracy, latency_ms[, schedule])``."""
        for number, rows in history.items():
            for step, acc, lat, *rest in rows:
                schedule = rest[0] if rest else None
                self.reports.setdefault((schedule, step), {})[number] = (acc, lat)

    def snapshot(self) -> dict:
        return self.reports

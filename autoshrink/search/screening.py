"""Screening by the calibrated latency predictor: a sampled candidate whose predicted latency clears
the budget by more than three held-out median errors is told to the study as over budget, in
milliseconds, instead of being sent to a worker to be compiled and timed.

The real measurement still decides every candidate that is fine-tuned: screening only ever
rejects, and only where the prediction is far over the budget. It is on by default only where
the predictor meets its goal on this machine (held-out Kendall τ ≥ 0.9 and median relative error
≤ 10 %, see :mod:`autoshrink.measure.calibration`); :func:`decide` says whether, and why not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from autoshrink.candidate import Candidate
from autoshrink.measure.calibration import GOAL_MEDIAN_ERROR, GOAL_TAU, MIN_EXAMPLES, Calibration, screen
from autoshrink.record import Reason, State, TrialAttr

__all__ = ["Decision", "Screener", "decide", "screened_metrics"]


@dataclass(frozen=True)
class Decision:
    """Whether the search screens with the predictor, and why (recorded as ``StudyAttr.PREDICTOR_SCREENING``)."""

    on: bool
    why: str

    def record(self, calibration: Calibration | None, machine: str) -> dict:
        out: dict[str, Any] = {"on": self.on, "why": self.why, "machine": machine}
        if calibration is not None:
            out.update(tau=calibration.tau, median_error=calibration.median_error, examples=calibration.n)
        return out


def decide(asked: bool | None, calibration: Calibration | None, *, budget_ms: float | None,
           timed_elsewhere: bool = False, latency_runs: int = 60) -> Decision:
    """Whether to screen: ``asked`` True forces it where a usable calibration exists, False turns it
    off, None (auto) turns it on only where the calibration meets the goal.

    Example:
        >>> decide(None, None, budget_ms=1.0).on
        False
    """
    if asked is False:
        return Decision(False, "turned off (predictor_screening=False)")
    if budget_ms is None:
        return Decision(False, "no latency budget")
    if latency_runs <= 0:
        return Decision(False, "latency is not measured (latency_runs=0)")
    if timed_elsewhere:
        return Decision(False, "latency is timed on a latency-target node, not by this machine's table")
    if calibration is None or not calibration.usable:
        n = 0 if calibration is None else calibration.n
        return Decision(False, f"no calibration of this machine's latency table yet ({n} of {MIN_EXAMPLES} "
                               "examples; every measured candidate of a search adds one)")
    if asked is True:
        return Decision(True, "turned on (predictor_screening=True)" + (
            "" if calibration.meets_goal else f"; the predictor misses its goal (τ {calibration.tau:.2f}, "
                                              f"median error {calibration.median_error:.1%})"))
    if not calibration.meets_goal:
        return Decision(False, f"the predictor misses its goal on this machine: held-out τ {calibration.tau:.2f} "
                               f"(goal ≥ {GOAL_TAU}), median error {calibration.median_error:.1%} "
                               f"(goal ≤ {GOAL_MEDIAN_ERROR:.0%}), {calibration.n} examples")
    return Decision(True, f"the predictor meets its goal: held-out τ {calibration.tau:.2f}, median error "
                          f"{calibration.median_error:.1%}, {calibration.n} examples")


def screened_metrics(predicted_ms: float, seconds: float) -> dict:
    """The outcome told to the study for a screened candidate: over budget, never fine-tuned, as a
    gate rejection is, with the prediction in place of a measured latency."""
    return {"state": State.COMPLETE.value, TrialAttr.MEETS_BUDGET: False, TrialAttr.ERROR: Reason.PREDICTED_OVER_BUDGET,
            TrialAttr.PREDICTED_LATENCY_MS: predicted_ms, TrialAttr.COMPRESS_S: seconds, TrialAttr.FINETUNE_S: 0.0}


class Screener:
    """Predicts sampled candidates with the machine's calibrated table and screens the far ones.

    Args:
        predictor: the machine's :class:`~autoshrink.measure.predictor.LatencyPredictor` (calibrated).
        task: the teacher (each candidate is pruned from it, not compiled).
        budget_ms: the latency budget.
    """

    def __init__(self, predictor, task, budget_ms: float) -> None:
        self.predictor, self.task, self.budget_ms = predictor, task, budget_ms
        self.saved = 0
        self.unpredicted = 0  # candidates that name a table entry not timed yet: sent to the gate

    def check(self, candidate: Candidate) -> dict | None:
        """The metrics to tell for ``candidate`` if it is screened, else None (send it to a worker)."""
        from autoshrink.compress import compress

        t0 = time.perf_counter()
        comp = compress(self.task.model, candidate, self.task.example_input)
        s = self.predictor.structure(comp.pruned, comp.bits, self.task.example_input)
        predicted = self.predictor.predict_structure(s, measure_missing=False)
        if predicted is None:
            self.unpredicted += 1
            return None
        if not screen(predicted, self.budget_ms, self.predictor.calibration.median_error):
            return None
        self.saved += 1
        return screened_metrics(predicted, time.perf_counter() - t0)

"""What a search runs with, as frozen data: :class:`SearchConfig` (the validated arguments of
:func:`autoshrink.search`), :class:`TrialSettings` (how each trial runs) and
:class:`DriverConfig` (what the ask/tell driver needs beyond the task, space and study)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from autoshrink.budget import Budget
from autoshrink.errors import AutoshrinkError, InputError

__all__ = [
    "DEFAULT_LATENCY_TARGET",
    "LATENCY_PRECHECK_TOLERANCE",
    "LATENCY_PRECHECK_TRIES",
    "SCREEN_FACTOR",
    "DriverConfig",
    "SearchConfig",
    "SearchError",
    "TrialSettings",
    "default_threads",
    "default_workers",
    "validate_counts",
]

#: the custom Ray resource that marks the node to time latency on, when none is named
DEFAULT_LATENCY_TARGET = "latency_target"
# `trials` counts fine-tuned candidates: those the budget gate rejects (measured in seconds,
# never fine-tuned) do not count, up to this many per trial asked for (then they count, so a
# space that is nearly all over budget still ends)
SCREEN_FACTOR = 4
# a cheapest configuration this much slower than the latency budget stops the search early, if it
# is in each of LATENCY_PRECHECK_TRIES timings (on a quiet machine two compilations of one model
# time within 10 %; another tenant's burst has been seen to double one timing)
LATENCY_PRECHECK_TOLERANCE = 1.25
LATENCY_PRECHECK_TRIES = 3


class SearchError(AutoshrinkError, RuntimeError):
    """The search cannot start or go on (bad run folder, mismatched resume, ...)."""


def default_workers() -> int:
    """One worker per two cores (each fine-tunes with two threads), at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


def default_threads(workers: int) -> int:
    """Torch threads per trial when not given: the cores shared out among the workers."""
    return max(1, (os.cpu_count() or 2) // workers)


@dataclass(frozen=True)
class TrialSettings:
    """How each trial runs, and how the driver itself times a candidate before the search.

    Args:
        threads: torch threads per trial.
        latency_threads: threads while timing latency.
        latency_runs: timed runs per latency measurement.
        seed: seeds fine-tuning (trial ``n`` uses ``seed + n``).
        lock_dir: the machine lock's folder (None: the default).
        device: where each trial fine-tunes (``"cpu"``, ``"cuda"``, ``"auto"``: resolved inside
            the Ray worker; see :func:`autoshrink.search.gpus.plan_devices`).
        gpus_per_trial: Ray's ``num_gpus`` for each trial (0: none; a fraction packs several).
        runtime: the deployment runtime latency and accuracy are taken in (see
            :mod:`autoshrink.runtimes`).
    """

    threads: int = 1
    latency_threads: int = 1
    latency_runs: int = 60
    seed: int = 0
    lock_dir: str | None = None
    device: str = "cpu"
    gpus_per_trial: float = 0.0
    runtime: str = "inductor"


@dataclass(frozen=True)
class DriverConfig:
    """What the ask/tell driver needs beyond the task, the space and the study.

    Args:
        budget: the limits; each trial's excess over them is its constraint.
        out: the run folder (each trial's files go to ``out/trials/NNNN``).
        workers: trials in flight at once.
        settings: how each trial runs.
        ray_address: join this Ray cluster (None: start a local one, loopback only).
        early_stopping: stop fine-tunes another trial clearly dominates (a shared ``Rungs`` actor).
        progress: show a progress bar.
        latency_target: the Ray resource naming the node to time latency on (see
            :func:`autoshrink.search`).
        screen_limit: at most this many over-budget candidates (never fine-tuned) do not count
            towards the total.
        minutes: start no new trial after this many minutes (None: no limit).
        predictor_screening: screen candidates the calibrated latency predictor puts far over the
            budget (see :mod:`autoshrink.search.screening`); None: only where it meets its goal.
    """

    budget: Budget
    out: Path
    workers: int = 1
    settings: TrialSettings = TrialSettings()
    ray_address: str | None = None
    early_stopping: bool = False
    progress: bool = False
    latency_target: str | None = None
    screen_limit: int = 0
    minutes: float | None = None
    predictor_screening: bool | None = None


@dataclass(frozen=True)
class SearchConfig:
    """The arguments of :func:`autoshrink.search`, validated and with their defaults resolved."""

    trials: int
    workers: int
    out: Path
    storage: str
    study_name: str
    join: bool  # an explicit storage: drivers sharing it join one study
    resume: bool
    seed: int
    sampler: str
    ray_address: str | None
    settings: TrialSettings
    early_stopping: bool
    enqueue_baselines: bool
    progress: bool
    max_drop: float | None
    latency_target: str | None
    screening: bool
    minutes: float | None
    predictor_screening: bool | None = None
    solver: bool = True  # enqueue the solver's proposals after the budget-edge baseline (autoshrink.search.solver)

    @property
    def runtime(self) -> str:
        """The deployment runtime the search times, evaluates and exports in."""
        return self.settings.runtime

    @property
    def time_here(self) -> bool:
        """Whether latency budgets are checked by timing on this machine before the search (on a
        cluster, latency may be timed on a target node, not here; a resumed study was checked)."""
        return not self.resume and self.ray_address is None and self.settings.latency_runs > 0

    def driver(self, budget: Budget, screen_limit: int) -> DriverConfig:
        return DriverConfig(
            budget=budget, out=self.out, workers=self.workers, settings=self.settings,
            ray_address=self.ray_address, early_stopping=self.early_stopping, progress=self.progress,
            latency_target=self.latency_target, screen_limit=screen_limit, minutes=self.minutes,
            predictor_screening=self.predictor_screening,
        )


def validate_counts(trials, workers, minutes) -> None:
    """The numeric arguments of a search, checked where they are given."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise InputError(f"trials must be a positive integer, got {trials!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InputError(f"workers must be a positive integer, got {workers!r}")
    if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
        raise InputError(f"minutes must be a positive number (or None: no limit), got {minutes!r}")

"""Checks before any trial runs, and the budget edge: what the driver measures itself.

A model ``torch.export`` cannot capture, or a budget even the space's cheapest configuration
misses, would fail or waste every trial; each is said once, before the search, naming what to
change. The budget edge finds, by bisection, the least uniform pruning that meets the budget,
so that the hand-tuned configuration is the first trial.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections.abc import Sequence

from autoshrink.budget import Budget
from autoshrink.candidate import Candidate
from autoshrink.record import TrialAttr
from autoshrink.search.baselines import as_sampled, baselines, space_defaults
from autoshrink.search.config import (
    LATENCY_PRECHECK_TOLERANCE,
    LATENCY_PRECHECK_TRIES,
    SearchError,
    TrialSettings,
)
from autoshrink.space import SearchSpace
from autoshrink.task import Task

__all__ = [
    "budget_edge", "check_exportable", "check_reachable", "cheapest", "edge_probe", "timing_context", "uniform_ratios",
]


def budget_edge(task: Task, space: SearchSpace, budget: Budget, settings: TrialSettings,
                base: Candidate | None = None, probes: Sequence[list] = (), probes_s: float = 0.0) -> dict | None:
    """The smallest uniform pruning ratio at which the all-int8 model meets ``budget``, by
    bisection over the space's pruning steps on exact size/MACs and *measured* latency (no
    fine-tuning: each probe costs one compress-lower-compile-time, a few seconds).

    It turns the fixed baselines into budget-aware ones (the hand-tuned config is tried first)
    and keeps the search from spending trials on uniform ratios known to miss the budget.
    Assumes more pruning is never slower, which holds up to timing noise.

    Args:
        probes: probes already taken (:func:`edge_probe`, e.g. the one the reachability check
            used): their ratios are not measured again.
        probes_s: the seconds those probes took (counted in ``seconds``).

    Returns:
        ``{"prune": ratio, "probes": [[ratio, latency_ms, size_mb, mmacs, meets], ...],
        "seconds": s, "error": ""}``; ``prune`` is None when no uniform ratio meets the budget
        or a probe failed (``error`` says why): the fixed baselines are used then. None when the
        budget sets no limit.
    """
    if not budget.constraints():
        return None
    start = time.perf_counter() - probes_s
    ratios = uniform_ratios(space)
    taken: list[list] = [list(p) for p in probes]
    seen: dict[float, bool] = {p[0]: bool(p[4]) for p in taken}

    def meets(i: int) -> bool:
        if ratios[i] not in seen:
            probe = edge_probe(task, space, budget, settings, base, ratio=ratios[i])
            seen[ratios[i]] = probe[4]
            taken.append(probe)
        return seen[ratios[i]]

    edge: float | None = None
    error = ""
    try:
        if meets(0):
            edge = ratios[0]
        elif meets(len(ratios) - 1):
            lo, hi = 0, len(ratios) - 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if meets(mid) else (mid, hi)
            edge = ratios[hi]
    except Exception as exc:  # noqa: BLE001 - each trial records its own failure; no verdict here
        error = f"{type(exc).__name__}: {exc}"[:300]
    return {"prune": edge, "probes": taken, "seconds": round(time.perf_counter() - start, 1),
            "error": error}


def edge_probe(task: Task, space: SearchSpace, budget: Budget, settings: TrialSettings,
               base: Candidate | None = None, *, ratio: float | None = None) -> list:
    """One probe of :func:`budget_edge`: the all-int8 baseline at uniform pruning ``ratio``
    (default: the space's least, i.e. unpruned) compressed, lowered, compiled and timed, with no
    fine-tune. A probe over a size or MACs limit is not timed (no speed makes up for it).

    Returns:
        ``[ratio, latency_ms, size_mb, mmacs, meets]``, ``meets`` judged on every limit.

    Raises:
        RuntimeError: the candidate could not be compressed, compiled or timed.
    """
    from autoshrink.trial import evaluate

    limits = budget.constraints()
    ratio = uniform_ratios(space)[0] if ratio is None else ratio
    cand = as_sampled(space, baselines(space, base or space_defaults(space), edge=ratio)[0])
    probe_budget = Budget(**{**limits, "latency_ms": 1e-9 if "latency_ms" in limits else None})
    r = evaluate(task, cand, probe_budget, timing_context(settings))
    if r.error:
        raise RuntimeError(r.error)
    metrics = {TrialAttr.LATENCY_MS: r.latency_ms, TrialAttr.SIZE_MB: r.size_mb, TrialAttr.MMACS: r.mmacs}
    ok = all(metrics[k] is not None and metrics[k] <= v for k, v in limits.items())
    return [ratio, r.latency_ms, r.size_mb, r.mmacs, ok]


def timing_context(settings: TrialSettings):
    """How the driver itself measures a candidate (budget checks before the search): as a trial
    does, under the machine lock."""
    from autoshrink.measure.latency import MachineLock
    from autoshrink.trial import TrialContext

    return TrialContext(threads=settings.threads, latency_threads=settings.latency_threads,
                        latency_runs=settings.latency_runs, lock=MachineLock(settings.lock_dir),
                        runtime=settings.runtime)


def uniform_ratios(space: SearchSpace) -> list[float]:
    """The uniform pruning ratios worth telling apart (:meth:`SearchSpace.uniform_prune_ratios`)."""
    return space.uniform_prune_ratios()


def cheapest(space: SearchSpace) -> Candidate:
    """The space's smallest, lightest configuration (:meth:`SearchSpace.cheapest`)."""
    return space.cheapest()


def check_exportable(task: Task) -> None:
    """Quantization and the saved model both go through ``torch.export``: a model it cannot
    capture would fail every trial, so say so once, before any trial runs.

    Raises:
        TaskError: naming the failure and the usual fix.
    """
    import copy

    from autoshrink.compress.quantize import export_model
    from autoshrink.task import TaskError

    quiet = logging.root.manager.disable
    logging.disable(logging.WARNING)  # torch logs and prints the partial graph; the error says it all
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            export_model(copy.deepcopy(task.model).eval(), task.example_input)
    except Exception as exc:  # the user's model: any failure here is the same finding
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise TaskError(
            f"the model cannot be captured by torch.export, which quantization and the saved model "
            f"need: {type(exc).__name__}: {first[:300]}. The usual cause is Python control flow on "
            "tensor values (`if x.sum() > 0:`); express it with torch.where or torch.cond"
        ) from exc
    finally:
        logging.disable(quiet)


def check_reachable(task: Task, space: SearchSpace, budget: Budget, settings: TrialSettings,
                    latency: bool, *, met: list | None = None) -> list[str]:
    """Fail early when even the cheapest configuration of the space misses the budget, naming
    the minimum achievable. Size and MACs are computed exactly (~1 s); latency, when ``latency``
    is set, is measured on the compiled cheapest model, with a tolerance for timing noise, and
    measured again (up to ``LATENCY_PRECHECK_TRIES`` times, the fastest counts) before refusing.

    ``met``: an :func:`edge_probe` just taken. When its configuration meets the whole budget, the
    budget is reachable and nothing is compressed or timed again (the search measures that probe
    anyway, for its budget edge: under a budget that does not bind, one compilation instead of two).

    Returns:
        Warnings, one line each, when the check could not give a verdict (the cheapest
        configuration failed to compress or to be timed): the search goes on, and each trial
        records its own failure, but the user hears that the budget was not checked.

    Raises:
        SearchError: naming the cheapest configuration's figures and what to change.
    """
    from autoshrink.compress import compress
    from autoshrink.measure.flops import model_cost
    from autoshrink.trial import evaluate

    limits = budget.constraints()
    if not limits or (met is not None and met[4]):
        return []
    low = cheapest(space)
    x = task.example_input
    unchecked = "the budget's reachability was not checked: the space's cheapest configuration"
    try:
        comp = compress(task.model, low, x)
        cost = model_cost(comp.pruned, x, comp.bits)
    except Exception as exc:  # noqa: BLE001 - each trial will record its own failure; said, not hidden
        return [f"{unchecked} could not be compressed ({type(exc).__name__}: {exc})"]
    found = {TrialAttr.SIZE_MB: cost.size_mb, TrialAttr.MMACS: cost.mmacs}
    units = {TrialAttr.SIZE_MB: "MB", TrialAttr.MMACS: "MMACs", TrialAttr.LATENCY_MS: "ms"}
    missed = {k: v for k, v in found.items() if k in limits and v > limits[k]}
    if not missed and latency and budget.latency_ms is not None:
        ctx = timing_context(settings)
        fastest = math.inf
        for _ in range(LATENCY_PRECHECK_TRIES):
            try:  # a budget no model meets: evaluate() stops right after timing the lowered model
                r = evaluate(task, low, Budget(latency_ms=1e-9), ctx)
            except Exception as exc:  # noqa: BLE001 - said, not hidden
                return [f"{unchecked} could not be timed ({type(exc).__name__}: {exc})"]
            if r.latency_ms is None:
                return [f"{unchecked} gave no latency ({r.error or 'no reason given'})"]
            fastest = min(fastest, r.latency_ms)
            if fastest <= budget.latency_ms * LATENCY_PRECHECK_TOLERANCE:
                break
        else:
            missed[TrialAttr.LATENCY_MS] = fastest
    if missed:
        got = ", ".join(f"{k} {v:.4g} {units[k]} > {limits[k]:g}" for k, v in missed.items())
        least = ", ".join(f"{k} {v:.4g} {units[k]}" for k, v in missed.items())
        raise SearchError(
            f"no configuration of the space {space.source} can meet the budget "
            f"({budget.describe()}): even the cheapest one (lowest bits, most pruning) has {got}. "
            f"The minimum achievable is about {least}: raise the budget or widen the space"
        )
    return []

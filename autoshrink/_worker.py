"""The Ray side of a trial: a thin adapter around :func:`autoshrink.trial.evaluate`.

It never raises for a trial's own failure: the error becomes a FAIL result with its reason, so
the driver records it and the search goes on. Process-level failures (a worker killed by the OS
or out of memory) surface in the driver as Ray errors and are recorded there.
"""

from __future__ import annotations

import math
import traceback
from typing import Any

__all__ = ["run_trial"]


def run_trial(
    task: Any,
    candidate: dict,
    budget: dict,
    context: dict,
    cached_logits: Any = None,
    rungs: Any = None,
    number: int = -1,
) -> dict:
    """Evaluate one candidate; returns ``TrialResult.metrics()`` (never raises for trial errors)."""
    from autoshrink import _env

    _env.configure()
    from autoshrink.budget import Budget
    from autoshrink.candidate import Candidate
    from autoshrink.compress.distill import StopTrial
    from autoshrink.device import resolve_device
    from autoshrink.measure.latency import MachineLock
    from autoshrink.trial import State, TrialContext, TrialResult, evaluate

    latency_box: dict[str, float] = {}

    def report(step: int, accuracy: float) -> None:
        if rungs is None:
            return
        import ray

        if ray.get(rungs.report.remote(number, step, accuracy, latency_box.get("latency_ms"),
                                       candidate.get("finetune_steps"))):
            raise StopTrial(f"dominated at step {step}")

    ctx = TrialContext(
        threads=context.get("threads", 1),
        latency_threads=context.get("latency_threads", 1),
        latency_runs=context.get("latency_runs", 60),
        lock=MachineLock(context.get("lock_dir")),
        cached_logits=cached_logits,
        report=report if rungs is not None else None,
        eval_every=context.get("eval_every", 0),
        artifact_dir=context.get("artifact_dir"),
        seed=context.get("seed", 0),
        measure=(_remote_measure(context["meter"], context.get("runtime", "inductor"))
                 if context.get("meter") is not None else None),
        runtime=context.get("runtime", "inductor"),
    )
    try:
        # "auto" here, in the worker: it sees the GPUs Ray gave this trial, not the driver's
        ctx.device = str(resolve_device(context.get("device", "cpu")))
        cand = Candidate.from_dict(candidate)
        result = evaluate(task, cand, Budget(**budget), ctx, on_latency=latency_box.update)
    except Exception as exc:  # a trial's failure is data, not a crash of the search
        result = TrialResult(state=State.FAIL, error=_reason(exc), runtime=ctx.runtime)
    out = result.metrics()
    from autoshrink.compress.quantize import patch_warnings, weight_range_warning
    from autoshrink.record import TrialAttr

    # torchao patches skipped in this worker, and 7-bit int8 weights on its CPU: said, not hidden
    out[TrialAttr.PATCH_WARNINGS] = patch_warnings() + [w for w in [weight_range_warning()] if w]
    for key, value in list(out.items()):
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
    return out


def _remote_measure(meter: Any, runtime: str = "inductor"):
    """``TrialContext.measure`` that ships the lowered model to a ``LatencyMeter`` actor (on the
    cluster's latency-target node) and waits for its timing in ``runtime``."""

    def measure(lowered, example_input, runs: int, threads: int):
        import ray

        from autoshrink._batches import first
        from autoshrink.measure.latency import program_bytes

        x = first(example_input, 1)
        program = program_bytes(lowered, x, dynamic_batch=runtime != "inductor")
        return ray.get(meter.measure.remote(program, x, runs, threads, runtime))

    return measure


def _reason(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    for frame in reversed(frames):
        if "autoshrink" in frame.filename:
            where = f" (at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})"
            break
    for cause in _chain(exc):  # also when wrapped, e.g. "the pruned model no longer runs (...)"
        text = str(cause)
        if isinstance(cause, MemoryError) or any(t in text.lower() for t in _OOM_TEXT):
            return f"out of memory: {type(cause).__name__}: {text}{where}"
    return f"{type(exc).__name__}: {exc}{where}"


# how allocation failures read: Python's MemoryError, torch's CPU allocator, CUDA
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, outermost first."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return out

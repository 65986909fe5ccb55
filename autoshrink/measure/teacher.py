"""The teacher's figures, the baseline every compressed model is compared with.

Accuracy (with its standard error), size, MACs and parameters, and fp32 latency both eager and
in the search's deployment runtime (compiled with Inductor by default; ONNX Runtime or OpenVINO
when the search deploys there): "× faster than the teacher" then compares like with like. torch
and the measuring modules are imported inside :func:`measure_teacher`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

__all__ = ["measure_teacher"]


def measure_teacher(task: Any, latency_threads: int = 1, latency_runs: int = 60, *,
                    runtime: str = "inductor") -> dict:
    """Measure the teacher of ``task``.

    Args:
        task: a :class:`~autoshrink.task.Task`; its ``teacher_accuracy``, when known, is used
            instead of evaluating again.
        latency_threads: torch threads while timing.
        latency_runs: timed calls per latency figure.
        runtime: the runtime ``latency_ms`` is timed in (fp32), as the search's trials are.

    Returns:
        ``{"accuracy", "accuracy_se", "latency_ms" (in ``runtime``), "latency_ms_eager", "size_mb",
        "mmacs", "params", "runtime", "runtime_version", "latency_threads"}``.

    Example:
        >>> measure_teacher(ash.tasks.get("digits"))  # doctest: +SKIP
    """
    import torch

    from autoshrink.candidate import Candidate
    from autoshrink.compress.quantize import compile_cpu, layer_bits
    from autoshrink.measure.flops import model_cost
    from autoshrink.measure.latency import MachineLock, measure_latency
    from autoshrink.runtimes import get as get_runtime
    from autoshrink.runtimes import time_lowered

    model = task.model.eval()
    x = task.example_input
    cost = model_cost(model, x, layer_bits(model, Candidate(default_bits=32)))
    lock = MachineLock()
    eager = measure_latency(model, x, runs=latency_runs, threads=latency_threads, lock=lock)
    if runtime == "inductor":
        compiled = measure_latency(
            compile_cpu(copy.deepcopy(model)), x, runs=latency_runs, threads=latency_threads, lock=lock
        )
        info = get_runtime(runtime).info(latency_threads)
    else:
        compiled = time_lowered(runtime, copy.deepcopy(model), x, runs=latency_runs, threads=latency_threads,
                                lock=lock)
        info = compiled.info
    torch._dynamo.reset()
    if task.teacher_accuracy is not None:
        acc, se = float(task.teacher_accuracy), None
        n = _val_len(task)
        if n:
            p = acc / 100
            se = 100 * math.sqrt(max(p * (1 - p), 0) / n)
    else:
        acc, se = task.evaluate(model)
    return {
        "accuracy": acc,
        "accuracy_se": se,
        "latency_ms": compiled.median_ms,
        "latency_ms_eager": eager.median_ms,
        "size_mb": cost.size_mb,
        "mmacs": cost.mmacs,
        "params": cost.params,
        **info.columns(),
    }


def _val_len(task: Any) -> int | None:
    try:
        return len(task.val_data.dataset if hasattr(task.val_data, "dataset") else task.val_data)
    except TypeError:
        return None

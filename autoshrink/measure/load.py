"""Is the machine quiet enough to time on? The load average per core, sampled before timing.

The machine lock (:class:`autoshrink.measure.latency.MachineLock`) keeps autoshrink's own trials
apart, but not other programs: on a shared machine another tenant's work slows every timing. Like
pyperf (``pyperf system show``), a load average above about 0.5 per core is reported as a noisy
machine; the figures are then kept, but said to be taken under load.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["NOISY_LOAD_PER_CORE", "load_warning", "sample_load"]

#: Load average per core above which a machine counts as noisy for timing (pyperf's threshold).
NOISY_LOAD_PER_CORE = 0.5


def sample_load(
    getloadavg: Callable[[], tuple[float, float, float]] | None = None,
    cores: int | None = None,
) -> dict:
    """The machine's load now: 1/5/15-minute load averages, cores, load per core, noisy or not.

    Args:
        getloadavg: the load-average source (``os.getloadavg`` by default; tests pass a fake).
        cores: CPU cores available to this process (default: its CPU affinity, else ``os.cpu_count``).

    Returns:
        ``{"load_1m", "load_5m", "load_15m", "cores", "load_per_core", "noisy"}``; on a platform
        without load averages the loads are None and ``noisy`` is None (unknown, not quiet).

    Example:
        >>> sample_load(lambda: (3.0, 2.0, 1.0), cores=4)["noisy"]
        True
    """
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            cores = os.cpu_count() or 1
    cores = max(int(cores), 1)
    try:
        one, five, fifteen = (getloadavg or os.getloadavg)()
    except (AttributeError, OSError):  # Windows has no load average
        return {"load_1m": None, "load_5m": None, "load_15m": None, "cores": cores,
                "load_per_core": None, "noisy": None}
    per_core = float(one) / cores
    return {
        "load_1m": float(one),
        "load_5m": float(five),
        "load_15m": float(fifteen),
        "cores": cores,
        "load_per_core": per_core,
        "noisy": per_core > NOISY_LOAD_PER_CORE,
    }


def load_warning(sample: dict) -> str | None:
    """One line for a noisy machine (see :func:`sample_load`), or None when it is quiet or unknown.

    Example:
        >>> load_warning(sample_load(lambda: (3.0, 2.0, 1.0), cores=2))[:53]
        'noisy machine: load average 3.00 on 2 cores (1.50 per'
    """
    if not sample.get("noisy"):
        return None
    return (
        f"noisy machine: load average {sample['load_1m']:.2f} on {sample['cores']} cores "
        f"({sample['load_per_core']:.2f} per core, above {NOISY_LOAD_PER_CORE:g}): other programs "
        "share the CPU, so latencies read high and vary"
    )

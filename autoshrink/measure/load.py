"""Is the machine quiet enough to time on? The CPU time others use now, sampled before timing.

The machine lock (:class:`autoshrink.measure.latency.MachineLock`) keeps autoshrink's own trials
apart, but not other programs: on a shared machine another tenant's work slows every timing. Like
pyperf (``pyperf system show``), more than about 0.5 busy cores per core is reported as a noisy
machine; the figures are then kept, but said to be taken under load.

What counts is the machine *now*: on Linux, the cores busy over a short window (``/proc/stat``,
:data:`WINDOW_S`, while the sampling process sleeps; a virtual machine's stolen time counts as busy).
The 1-minute load average is recorded beside it but decides only where no window can be sampled:
it decays over minutes, so right after a search's own trials or a compile it still reads 1-2 on an
idle machine, and a warning built on it would blame "other programs" for autoshrink's own work.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["NOISY_LOAD_PER_CORE", "WINDOW_S", "busy_cores", "load_warning", "sample_load"]

#: Busy cores (or load average) per core above which a machine counts as noisy for timing (pyperf's threshold).
NOISY_LOAD_PER_CORE = 0.5
#: Seconds over which :func:`busy_cores` watches the CPUs.
WINDOW_S = 0.25


def _cpu_ticks(text: str, cpus: set[int] | None = None) -> tuple[int, int, int] | None:
    """(busy, total, CPUs counted) clock ticks from ``/proc/stat``: the lines of ``cpus`` (``cpuN``),
    or the all-CPU line when ``cpus`` is None; None when the text has none of them."""
    busy = total = counted = 0
    for line in text.splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("cpu"):
            continue
        name = fields[0][3:]  # "" on the all-CPU line
        if cpus is None:
            if name:
                continue
        elif not name.isdigit() or int(name) not in cpus:
            continue
        try:
            ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        except ValueError:
            return None
        if len(ticks) < 4:
            return None
        busy += sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
        total += sum(ticks)
        counted += 1
    return (busy, total, counted) if counted else None


def busy_cores(
    window_s: float = WINDOW_S,
    *,
    read: Callable[[], str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    cpus: set[int] | None = None,
) -> float | None:
    r"""How many of this process's CPUs were busy (not idle, not waiting on I/O; a virtual machine's
    stolen time counts as busy) over the next ``window_s`` seconds, the caller sleeping meanwhile so
    that it does not count itself; None off Linux.

    Args:
        window_s: how long to watch.
        read: returns ``/proc/stat``'s text (tests pass fakes).
        sleep: waits ``window_s`` (tests pass a no-op).
        cpus: the CPUs to watch (default: this process's affinity; all CPUs where it has none).

    Example:
        >>> stats = iter(["cpu0 100 0 0 400 0 0 0 0\ncpu1 0 0 0 500 0 0 0 0",
        ...               "cpu0 150 0 0 400 0 0 0 0\ncpu1 0 0 0 550 0 0 0 0"])
        >>> busy_cores(read=lambda: next(stats), sleep=lambda s: None, cpus={0, 1})
        1.0
    """
    if cpus is None:
        try:
            cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux: the all-CPU line, if there is one
            cpus = None
    reader = read or (lambda: Path("/proc/stat").read_text())
    try:
        before = _cpu_ticks(reader(), cpus)
        sleep(window_s)
        after = _cpu_ticks(reader(), cpus)
    except OSError:
        return None
    if before is None or after is None or after[2] != before[2] or after[1] <= before[1]:
        return None
    ticks_per_cpu = (after[1] - before[1]) / after[2]
    return max(after[0] - before[0], 0) / ticks_per_cpu


def sample_load(
    getloadavg: Callable[[], tuple[float, float, float]] | None = None,
    cores: int | None = None,
    busy: Callable[[], float | None] | None = busy_cores,
) -> dict:
    """The machine's load now: busy cores over a short window, 1/5/15-minute load averages, cores,
    load per core, noisy or not.

    Args:
        getloadavg: the load-average source (``os.getloadavg`` by default; tests pass a fake).
        cores: CPU cores available to this process (default: its CPU affinity, else ``os.cpu_count``).
        busy: the cores busy now (:func:`busy_cores` by default; None, or a callable returning None,
            when no window can be sampled: the load average then decides).

    Returns:
        ``{"busy_cores", "load_1m", "load_5m", "load_15m", "cores", "load_per_core", "noisy",
        "noisy_by"}``: ``load_per_core`` is the busy cores per core where a window was sampled, else
        the 1-minute load average per core, and ``noisy_by`` says which (``"busy"`` or
        ``"load_average"``). With neither, ``noisy`` is None (unknown, not quiet).

    Example:
        >>> sample_load(lambda: (3.0, 2.0, 1.0), cores=4, busy=None)["noisy"]
        True
        >>> sample_load(lambda: (3.0, 2.0, 1.0), cores=4, busy=lambda: 0.2)["noisy"]   # the load was earlier
        False
    """
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            cores = os.cpu_count() or 1
    cores = max(int(cores), 1)
    now = busy() if busy is not None else None
    try:
        loads: list[float | None] = [float(v) for v in (getloadavg or os.getloadavg)()]
    except (AttributeError, OSError):  # Windows has no load average
        loads = [None, None, None]
    if now is not None:
        per_core, by = float(now) / cores, "busy"
    elif loads[0] is not None:
        per_core, by = loads[0] / cores, "load_average"
    else:
        per_core, by = None, None
    return {
        "busy_cores": None if now is None else float(now),
        "load_1m": loads[0],
        "load_5m": loads[1],
        "load_15m": loads[2],
        "cores": cores,
        "load_per_core": per_core,
        "noisy": None if per_core is None else per_core > NOISY_LOAD_PER_CORE,
        "noisy_by": by,
    }


def load_warning(sample: dict) -> str | None:
    """One line for a noisy machine (see :func:`sample_load`), or None when it is quiet or unknown.

    Example:
        >>> load_warning(sample_load(lambda: (3.0, 2.0, 1.0), cores=2, busy=None))[:53]
        'noisy machine: load average 3.00 on 2 cores (1.50 per'
        >>> load_warning(sample_load(lambda: (0.1, 0.1, 0.1), cores=2, busy=lambda: 1.5))[:57]
        'noisy machine: 1.50 of 2 cores busy with other work while'
    """
    if not sample.get("noisy"):
        return None
    if sample.get("noisy_by") == "busy":
        return (
            f"noisy machine: {sample['busy_cores']:.2f} of {sample['cores']} cores busy with other work while "
            f"autoshrink waited to time ({sample['load_per_core']:.2f} per core, above {NOISY_LOAD_PER_CORE:g}): "
            "other programs share the CPU, so latencies read high and vary"
        )
    return (
        f"noisy machine: load average {sample['load_1m']:.2f} on {sample['cores']} cores "
        f"({sample['load_per_core']:.2f} per core, above {NOISY_LOAD_PER_CORE:g}): other programs "
        "share the CPU, so latencies read high and vary"
    )

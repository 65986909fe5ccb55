"""Where a run's numbers come from: the device(s) trials fine-tuned on, and where (and in which
runtime) latency was timed. One sentence, shown by the terminal summary and ``report.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from autoshrink.record import StudyAttr, TrialAttr

__all__ = ["where_text"]

#: the runtime that timed latency when a run does not say (before ``--runtime`` existed: Inductor)
DEFAULT_RUNTIME = "inductor"
#: the per-trial column naming the runtime that timed it (DESIGN.md's ``runtime``)
RUNTIME_COLUMN = "runtime"


def where_text(trials: pd.DataFrame, meta: Mapping[str, Any]) -> str:
    """``"Fine-tuned on cuda:0 (NVIDIA H200); latency timed on the CPU of each trial's machine
    (runtime inductor)."``: from the trials' ``finetune_device`` and the study's attributes.

    Example:
        >>> df = pd.DataFrame({"finetune_device": ["cpu", "cpu", None]})
        >>> where_text(df, {})
        "Fine-tuned on cpu; latency timed on the CPU of each trial's machine (runtime inductor)."
        >>> where_text(df.iloc[:0], {"latency_measured_on": {"resource": "latency_target", "host": "pi4"}})
        "No trial was fine-tuned; latency timed on pi4 (the Ray node with resource 'latency_target'; runtime inductor)."
    """
    col = TrialAttr.FINETUNE_DEVICE
    devices = trials[col].dropna() if col in trials.columns else pd.Series(dtype=object)
    devices = devices[devices.astype(str) != ""]
    counts = devices.value_counts()
    if len(counts) == 1:
        tuned = f"Fine-tuned on {counts.index[0]}"
    elif len(counts) > 1:
        tuned = "Fine-tuned on " + ", ".join(f"{d} ({n} trial{'s' if n != 1 else ''})" for d, n in counts.items())
    else:
        tuned = "No trial was fine-tuned"
    runtimes = (trials[RUNTIME_COLUMN].dropna().astype(str).unique().tolist()
                if RUNTIME_COLUMN in trials.columns else [])
    runtime = ", ".join(sorted(r for r in runtimes if r)) or DEFAULT_RUNTIME
    target = meta.get(StudyAttr.LATENCY_MEASURED_ON)
    if isinstance(target, Mapping) and target:
        host = target.get("host") or "the latency-target node"
        timed = (f"latency timed on {host} (the Ray node with resource {target.get('resource')!r}; "
                 f"runtime {runtime})")
    else:
        timed = f"latency timed on the CPU of each trial's machine (runtime {runtime})"
    return f"{tuned}; {timed}."

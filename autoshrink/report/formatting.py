"""Formatting shared by every output: units, number formats, column headers, cell texts, colours.

Pure functions of a value (or a row) to text; nothing here decides what a table or plot shows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from autoshrink.frontier import Direction
from autoshrink.record import State, TrialAttr

#: Columns offered on the axes of the interactive plot, in menu order.
AXIS_COLUMNS = ("latency_ms", "size_mb", "mmacs", "bops", "params", "accuracy")


# column -> (name, unit) for labels; the unit is what the column's suffix promises.
UNITS: dict[str, tuple[str, str]] = {
    "accuracy": ("Accuracy", "%"),
    "latency_ms": ("Latency", "ms"),
    "size_mb": ("Model size", "MB"),
    "mmacs": ("MACs", "millions"),
    "bops": ("Bit operations", "BOPs"),
    "params": ("Parameters", "count"),
    "finetune_s": ("Fine-tune time", "s"),
    # deployed where the shipped artifact was re-timed, the trial's gate figure otherwise
    "latency_ms_effective": ("Latency (deployed where re-timed)", "ms"),
    "latency_ms_deployed": ("Latency, shipped artifact", "ms"),
    "test_accuracy": ("Test accuracy", "%"),
}


FAILED_STATES = frozenset({State.FAIL.value, State.PRUNED.value})
UNFINISHED_STATES = frozenset({State.RUNNING.value, State.WAITING.value})
PARAM_PREFIX = "param_"

# Colours shared by both back ends so the PNG and the HTML read the same.
C_FEASIBLE = "#1f77b4"
C_INFEASIBLE = "#9a9a9a"
C_FAILED = "#d62728"
C_FRONT = "#ff7f0e"
C_BUDGET = "#c0392b"
C_TEACHER = "#f1c40f"


def axis_label(col: str) -> str:
    name, unit = UNITS.get(col, (col, ""))
    return f"{name} ({unit})" if unit else name


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def si_text(value: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {suffix}"
    return f"{value:.3g} "


def limit_text(col: str, limit: float) -> str:
    """A budget limit as the user set it: ``Latency ≤ 5 ms`` (the deployed and the gate latency
    columns are both held to the latency budget), not the column's internal name.

    Example:
        >>> limit_text("latency_ms_effective", 5.0)
        'Latency ≤ 5 ms'
    """
    base = "latency_ms" if col.startswith("latency_ms") else col
    return f"{UNITS.get(base, (base, ''))[0]} ≤ {fmt_value(base, limit)}"


def fmt_value(col: str, value: Any) -> str:
    """A value with its unit, short enough for a label: ``3.41 ms``, ``97.2%``, ``1.2 M params``."""
    if is_missing(value):
        return "—"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if col == "accuracy":
        return f"{v:.2f}%"
    if col == "latency_ms":
        return f"{v:.3g} ms"
    if col == "size_mb":
        return f"{v:.3g} MB"
    if col == "mmacs":
        return f"{v:.3g} MMACs"
    if col == "bops":
        return f"{si_text(v)}BOPs"
    if col == "params":
        return f"{si_text(v).replace(' ', '')} params"
    if col == "finetune_s":
        return f"{v:.1f} s"
    return fmt_plain(value)


def fmt_plain(value: Any) -> str:
    """A table cell: integers as integers, floats to 4 significant digits, the rest as text."""
    if is_missing(value):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return str(value)


def as_number(value: Any) -> float | None:
    if is_missing(value):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def param_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if str(c).startswith(PARAM_PREFIX)]


def upper_states(df: pd.DataFrame) -> pd.Series:
    if "state" not in df.columns:
        return pd.Series(State.COMPLETE.value, index=df.index)
    return df["state"].astype(str).str.upper()


def default_direction(col: str) -> Direction:
    return Direction.MAX if col == "accuracy" else Direction.MIN


# column -> header of the front tables (terminal and report.md): the unit, not the suffix
HEADERS = {"number": "trial", "accuracy": "accuracy %", "latency_ms": "latency ms",
            "size_mb": "size MB", "mmacs": "MMACs", "meets_budget": "budget",
            "test_accuracy": "test accuracy %", "latency_ms_deployed": "deployed ms",
            "latency_ms_effective": "deciding ms"}  # deployed where re-timed, else the gate figure


DECIMALS = {"latency_ms": 3, "size_mb": 3, "mmacs": 2, "latency_ms_deployed": 3, "latency_ms_effective": 3}


def header_of(col: str) -> str:
    if col in HEADERS:
        return HEADERS[col]
    return col[len(PARAM_PREFIX):] if col.startswith(PARAM_PREFIX) else col


def accuracy_cell(row: pd.Series) -> str:
    acc, se = row.get("accuracy"), row.get("accuracy_se")
    if is_missing(acc):
        return "—"
    return f"{float(acc):.2f}" + ("" if is_missing(se) else f" ± {float(se):.2f}")


def cell_text(row: pd.Series, col: str) -> str:
    if col == "accuracy":
        return accuracy_cell(row)
    if col == "test_accuracy":
        acc, se = row.get("test_accuracy"), row.get("test_accuracy_se")
        return "—" if is_missing(acc) else f"{float(acc):.2f}" + ("" if is_missing(se) else f" ± {float(se):.2f}")
    if col == "mmacs" and not is_missing(row.get(TrialAttr.UNCOUNTED_OPS)) and str(row.get(TrialAttr.UNCOUNTED_OPS)):
        value = as_number(row.get(col))  # some operator fvcore does not count: a lower bound
        return "—" if value is None else f"at least {value:.{DECIMALS[col]}f}"
    if col == "number":
        return f"#{fmt_plain(row.get(col))}"
    value = as_number(row.get(col))
    if value is not None and col in DECIMALS:
        # fixed decimals per column, so that values line up and compare at a glance
        return f"{value:.{DECIMALS[col]}f}"
    return fmt_plain(row.get(col))


def ratio_text(ratio: float, col: str) -> str:
    """``3.40× faster`` / ``1.22× slower``: teacher / trial, said the way that reads as > 1."""
    better, worse = {"latency_ms": ("faster", "slower"), "size_mb": ("smaller", "larger")}.get(
        col, ("fewer", "more"))
    return f"{ratio:.2f}× {better}" if ratio >= 1 else f"{1 / ratio:.2f}× {worse}"

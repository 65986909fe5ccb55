"""The records every output renders: what a Pareto plot shows, how the chosen model compares with
the teacher, which trials came closest to a budget and what each would have to change.

Each record is computed once from the trials (pure functions of DataFrames and rows); the
terminal tables (:mod:`.terminal`), ``report.md`` (:mod:`.markdown`), the PNG (:mod:`.png`) and the
HTML (:mod:`.html`) only format it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from autoshrink.frontier import Direction, feasible, pareto_front
from autoshrink.record import State
from autoshrink.report.formatting import (
    FAILED_STATES,
    UNFINISHED_STATES,
    UNITS,
    as_number,
    axis_label,
    default_direction,
    fmt_value,
    limit_text,
    param_columns,
    upper_states,
)

__all__ = [
    "Comparison",
    "NearMiss",
    "ParetoPlotData",
    "budget_limits",
    "compare_with_teacher",
    "front_columns",
    "near_misses",
    "pareto_plot_data",
    "what_to_change",
]


@dataclass(frozen=True)
class ParetoPlotData:
    """What a Pareto plot shows, independent of the drawing library.

    Attributes:
        x, y: the columns on the axes.
        feasible: COMPLETE trials that meet the budget (all COMPLETE trials without a budget).
        infeasible: COMPLETE trials that miss it; their accuracy is often unmeasured (NaN), since
            such candidates are never fine-tuned.
        failed: FAIL and PRUNED trials.
        front: the Pareto-optimal trials, sorted by ``x`` ascending.
        front_objectives: the objectives the front was computed on.
        chosen: the selected trial, if any.
        teacher: the uncompressed model's figures (``{"accuracy": .., "latency_ms": ..}``), if any.
        budget: every constraint, column -> upper limit.
        n_unfinished: RUNNING / WAITING trials (not drawn).
    """

    x: str
    y: str
    feasible: pd.DataFrame
    infeasible: pd.DataFrame
    failed: pd.DataFrame
    front: pd.DataFrame
    front_objectives: dict[str, Direction]
    chosen: pd.Series | None = None
    teacher: dict[str, float] | None = None
    budget: dict[str, float] = field(default_factory=dict)
    n_unfinished: int = 0

    @property
    def x_label(self) -> str:
        return axis_label(self.x)

    @property
    def y_label(self) -> str:
        return axis_label(self.y)

    @property
    def x_limit(self) -> float | None:
        return self.budget.get(self.x)

    @property
    def y_limit(self) -> float | None:
        return self.budget.get(self.y)

    @property
    def has_budget(self) -> bool:
        return bool(self.budget) or len(self.infeasible) > 0

    @property
    def front_is_curve(self) -> bool:
        """True when the front is over exactly the two axes, so it can be drawn as a step line."""
        return set(self.front_objectives) == {self.x, self.y}

    @property
    def n_trials(self) -> int:
        return len(self.feasible) + len(self.infeasible) + len(self.failed) + self.n_unfinished

    @property
    def title(self) -> str:
        name_y, name_x = UNITS.get(self.y, (self.y, ""))[0], UNITS.get(self.x, (self.x, ""))[0]
        text = f"{name_y} vs {name_x.lower()}: {self.n_trials} trials"
        if self.has_budget:
            text += f", {len(self.feasible)} meet the budget"
        return text

    @property
    def budget_text(self) -> str:
        return ", ".join(limit_text(col, lim) for col, lim in self.budget.items())


def _chosen_row(df: pd.DataFrame, chosen: pd.Series | int | None) -> pd.Series | None:
    if chosen is None or isinstance(chosen, pd.Series):
        return chosen
    if isinstance(chosen, (int, np.integer)) and not isinstance(chosen, bool):
        if "number" in df.columns:
            hits = df[pd.to_numeric(df["number"], errors="coerce") == int(chosen)]
            if len(hits):
                return hits.iloc[0]
        raise ValueError(f"chosen trial #{int(chosen)} is not in the trials DataFrame")
    raise TypeError(f"chosen must be a row (pandas Series), a trial number or None, got {chosen!r}")


def pareto_plot_data(
    df: pd.DataFrame,
    *,
    x: str = "latency_ms",
    y: str = "accuracy",
    constraints: Mapping[str, float | None] | None = None,
    chosen: pd.Series | int | None = None,
    teacher: Mapping[str, float] | None = None,
    objectives: Mapping[str, str | Direction] | None = None,
) -> ParetoPlotData:
    """Sort the trials into what a Pareto plot shows (the record both back ends draw).

    Without ``constraints`` the ``meets_budget`` column (if any) decides feasibility.

    Args:
        df: trials, one row per trial.
        x, y: columns on the axes.
        constraints: column -> upper limit.
        chosen: the selected row (or its trial number) to highlight.
        teacher: the uncompressed model's figures.
        objectives: what the front is computed on; defaults to ``y`` and ``x`` (``accuracy``
            maximised, everything else minimised).

    Returns:
        A :class:`ParetoPlotData`.

    Raises:
        ValueError: ``x`` or ``y`` (or a constraint or objective) is not a column.

    Example:
        >>> df = pd.DataFrame({"number": [0, 1], "state": ["COMPLETE", "FAIL"],
        ...                    "accuracy": [97.0, None], "latency_ms": [3.0, None]})
        >>> data = pareto_plot_data(df, constraints={"latency_ms": 5.0})
        >>> len(data.feasible), len(data.failed), len(data.front)
        (1, 1, 1)
    """
    for col in (x, y):
        if col not in df.columns:
            raise ValueError(
                f"cannot plot {col!r}: it is not a column of the trials DataFrame; "
                f"available columns: {sorted(map(str, df.columns))}"
            )
    states = upper_states(df)
    complete = states == State.COMPLETE.value
    failed = states.isin(FAILED_STATES)
    if constraints:
        ok = feasible(df, constraints)
    elif "meets_budget" in df.columns:
        # NaN (not judged) counts as meeting it: without a budget nothing can miss it.
        ok = complete & (df["meets_budget"].map(lambda v: v is not False and v != 0))
    else:
        ok = complete
    if objectives is None:
        objectives = {y: default_direction(y), x: default_direction(x)}
    front_objectives = {c: Direction.parse(d, column=c) for c, d in objectives.items()}
    front = pareto_front(df, front_objectives)
    if len(front):
        front = front.iloc[np.argsort(pd.to_numeric(front[x]).to_numpy(float), kind="stable")]
    limits = budget_limits(constraints)
    return ParetoPlotData(
        x=x,
        y=y,
        feasible=df[complete & ok],
        infeasible=df[complete & ~ok],
        failed=df[failed],
        front=front,
        front_objectives=front_objectives,
        chosen=_chosen_row(df, chosen),
        teacher=dict(teacher) if teacher else None,
        budget=limits,
        n_unfinished=int(states.isin(UNFINISHED_STATES).sum()),
    )


def front_columns(front: pd.DataFrame, objectives: Sequence[str], params: bool = True) -> list[str]:
    """The columns of a front table (terminal and ``report.md``): the trial, the objectives, the
    other metrics present, then (``params``) the sampled values."""
    columns = ["number"] if "number" in front.columns else []  # shown as "#"
    columns += [c for c in objectives if c not in columns]
    columns += [c for c in ("accuracy", "latency_ms", "size_mb", "mmacs", "meets_budget")
                if c in front.columns and c not in columns]
    # after the trials: the test split, and the shipped artifact re-timed (when there are any)
    for after, col in (("accuracy", "test_accuracy"), ("latency_ms", "latency_ms_deployed")):
        redundant = col == "latency_ms_deployed" and "latency_ms_effective" in columns  # the same figures
        if (col in front.columns and col not in columns and not redundant
                and pd.to_numeric(front[col], errors="coerce").notna().any()):
            columns.insert(columns.index(after) + 1 if after in columns else len(columns), col)
    return columns + (param_columns(front) if params else [])


def what_to_change(row: pd.Series, limits: Mapping[str, float]) -> str:
    """What ``row`` would have to change to meet every limit, in words (``"within every limit"``)."""
    needs = []
    for col, limit in limits.items():
        value = as_number(row.get(col))
        if value is None:
            needs.append(f"{col} not measured")
        elif value > limit:
            cut = 100.0 * (1.0 - limit / value) if value > 0 else float("nan")
            needs.append(
                f"needs {cut:.0f}% lower {col} ({fmt_value(col, value)} → ≤ {fmt_value(col, limit)})"
            )
    return "; ".join(needs) if needs else "within every limit"


def budget_limits(constraints: Mapping[str, float | None] | None) -> dict[str, float]:
    """The constraints that are set, as ``{column: upper limit}``."""
    return {str(c): float(v) for c, v in (constraints or {}).items() if v is not None}


@dataclass(frozen=True)
class Comparison:
    """One metric of the chosen trial beside the teacher's.

    Attributes:
        column: the metric (``accuracy``, ``latency_ms``, ...).
        chosen, teacher: the values as recorded (may be missing or not numeric).
    """

    column: str
    chosen: Any
    teacher: Any

    @property
    def chosen_number(self) -> float | None:
        return as_number(self.chosen)

    @property
    def teacher_number(self) -> float | None:
        return as_number(self.teacher)

    @property
    def drop(self) -> float | None:
        """Accuracy only: teacher minus chosen, in points (negative when the chosen one is better)."""
        c, t = self.chosen_number, self.teacher_number
        if self.column != "accuracy" or c is None or t is None:
            return None
        return t - c

    @property
    def ratio(self) -> float | None:
        """Other metrics: teacher / chosen (> 1 when the chosen model is cheaper); None if unknown."""
        c, t = self.chosen_number, self.teacher_number
        if self.column == "accuracy" or c is None or t is None or not c > 0:
            return None
        return t / c

    @property
    def accuracy_change(self) -> str:
        """``"0.40 points lower"`` / ``"0.10 points higher"``; empty when not an accuracy."""
        drop = self.drop
        if drop is None:
            return ""
        return f"{drop:.2f} points lower" if drop >= 0 else f"{-drop:.2f} points higher"


def compare_with_teacher(chosen: pd.Series, teacher: Mapping[str, Any], metrics: Sequence[str]) -> list[Comparison]:
    """The chosen trial against the teacher, one :class:`Comparison` per metric in ``metrics``.

    Example:
        >>> rows = compare_with_teacher(pd.Series({"accuracy": 97.0, "latency_ms": 2.0}),
        ...                             {"accuracy": 98.0, "latency_ms": 6.0}, ["accuracy", "latency_ms"])
        >>> rows[0].accuracy_change, rows[1].ratio
        ('1.00 points lower', 3.0)
    """
    return [Comparison(col, chosen.get(col), teacher.get(col)) for col in metrics]


@dataclass(frozen=True)
class NearMiss:
    """A trial close to the budget: its row, and what it would have to change to meet it."""

    row: pd.Series
    needs: str

    @property
    def number(self) -> Any:
        return self.row.get("number")


def near_misses(nearest: pd.DataFrame, limits: Mapping[str, float]) -> list[NearMiss]:
    """One :class:`NearMiss` per row of ``nearest`` (from :func:`autoshrink.frontier.nearest_feasible`),
    in its order.

    Example:
        >>> [m.needs for m in near_misses(pd.DataFrame({"number": [3], "latency_ms": [8.0]}), {"latency_ms": 6.0})]
        ['needs 25% lower latency_ms (8 ms → ≤ 6 ms)']
    """
    return [NearMiss(row, what_to_change(row, limits)) for _, row in nearest.iterrows()]

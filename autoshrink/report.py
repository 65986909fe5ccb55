"""Tables and plots of a run: the Pareto plot (PNG and interactive HTML), rich tables, report.md.

Plots follow Optuna's pattern: :func:`pareto_plot_data` first reduces the trials to a plain
:class:`ParetoPlotData` record (which trials are feasible, infeasible, failed, on the front, chosen;
where the budget lines go), then a back end draws that record: matplotlib for the PNG, plotly for
the HTML. matplotlib, plotly and rich are imported inside the functions that use them, so
``import autoshrink.report`` stays light.

Every file is written to a temporary name in the target folder first and then moved into place with
``os.replace``, so a crash never leaves half a report behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from autoshrink._files import atomic_path, write_text_atomic
from autoshrink.frontier import Direction, feasible, pareto_front

if TYPE_CHECKING:  # pragma: no cover - typing only
    from rich.table import Table

__all__ = [
    "AXIS_COLUMNS",
    "ParetoPlotData",
    "chosen_table",
    "front_table",
    "nearest_table",
    "pareto_plot_data",
    "plan_table",
    "plot_pareto",
    "plot_pareto_html",
    "trials_table",
    "write_csv_atomic",
    "write_report_md",
]

#: Columns offered on the axes of the interactive plot, in menu order.
AXIS_COLUMNS = ("latency_ms", "size_mb", "mmacs", "bops", "params", "accuracy")

# column -> (name, unit) for labels; the unit is what the column's suffix promises.
_UNITS: dict[str, tuple[str, str]] = {
    "accuracy": ("Accuracy", "%"),
    "latency_ms": ("Latency", "ms"),
    "size_mb": ("Model size", "MB"),
    "mmacs": ("MACs", "millions"),
    "bops": ("Bit operations", "BOPs"),
    "params": ("Parameters", "count"),
    "finetune_s": ("Fine-tune time", "s"),
}
_FAILED_STATES = frozenset({"FAIL", "PRUNED"})
_UNFINISHED_STATES = frozenset({"RUNNING", "WAITING"})
_PARAM_PREFIX = "param_"

# Colours shared by both back ends so the PNG and the HTML read the same.
_C_FEASIBLE = "#1f77b4"
_C_INFEASIBLE = "#9a9a9a"
_C_FAILED = "#d62728"
_C_FRONT = "#ff7f0e"
_C_BUDGET = "#c0392b"
_C_TEACHER = "#f1c40f"


# --------------------------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------------------------


def _axis_label(col: str) -> str:
    name, unit = _UNITS.get(col, (col, ""))
    return f"{name} ({unit})" if unit else name


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _si(value: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {suffix}"
    return f"{value:.3g} "


def _fmt(col: str, value: Any) -> str:
    """A value with its unit, short enough for a label: ``3.41 ms``, ``97.2%``, ``1.2 M params``."""
    if _is_missing(value):
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
        return f"{_si(v)}BOPs"
    if col == "params":
        return f"{_si(v).replace(' ', '')} params"
    if col == "finetune_s":
        return f"{v:.1f} s"
    return _fmt_plain(value)


def _fmt_plain(value: Any) -> str:
    """A table cell: integers as integers, floats to 4 significant digits, the rest as text."""
    if _is_missing(value):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return str(value)


def _param_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if str(c).startswith(_PARAM_PREFIX)]


def _states(df: pd.DataFrame) -> pd.Series:
    if "state" not in df.columns:
        return pd.Series("COMPLETE", index=df.index)
    return df["state"].astype(str).str.upper()


def _default_direction(col: str) -> Direction:
    return Direction.MAX if col == "accuracy" else Direction.MIN


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def write_csv_atomic(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` as CSV (without the index) through a temporary file and ``os.replace``.

    Args:
        df: the table to write.
        path: destination; missing parent folders are created.

    Returns:
        The destination path.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "trials.csv"
        >>> write_csv_atomic(pd.DataFrame({"number": [0, 1]}), out).read_text().splitlines()
        ['number', '0', '1']
    """
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


# --------------------------------------------------------------------------------------------
# the plot record
# --------------------------------------------------------------------------------------------


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
        return _axis_label(self.x)

    @property
    def y_label(self) -> str:
        return _axis_label(self.y)

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
        name_y, name_x = _UNITS.get(self.y, (self.y, ""))[0], _UNITS.get(self.x, (self.x, ""))[0]
        text = f"{name_y} vs {name_x.lower()}: {self.n_trials} trials"
        if self.has_budget:
            text += f", {len(self.feasible)} meet the budget"
        return text

    @property
    def budget_text(self) -> str:
        return ", ".join(f"{col} ≤ {_fmt(col, lim)}" for col, lim in self.budget.items())


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
    states = _states(df)
    complete = states == "COMPLETE"
    failed = states.isin(_FAILED_STATES)
    if constraints:
        ok = feasible(df, constraints)
    elif "meets_budget" in df.columns:
        # NaN (not judged) counts as meeting it: without a budget nothing can miss it.
        ok = complete & (df["meets_budget"].map(lambda v: v is not False and v != 0))
    else:
        ok = complete
    if objectives is None:
        objectives = {y: _default_direction(y), x: _default_direction(x)}
    front_objectives = {c: Direction.parse(d, column=c) for c, d in objectives.items()}
    front = pareto_front(df, front_objectives)
    if len(front):
        front = front.iloc[np.argsort(pd.to_numeric(front[x]).to_numpy(float), kind="stable")]
    limits = {str(c): float(v) for c, v in (constraints or {}).items() if v is not None}
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
        n_unfinished=int(states.isin(_UNFINISHED_STATES).sum()),
    )


def _xy(rows: pd.DataFrame, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        pd.to_numeric(rows[x], errors="coerce").to_numpy(dtype=float),
        pd.to_numeric(rows[y], errors="coerce").to_numpy(dtype=float),
    )


# --------------------------------------------------------------------------------------------
# matplotlib back end
# --------------------------------------------------------------------------------------------


def plot_pareto(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    x: str = "latency_ms",
    y: str = "accuracy",
    constraints: Mapping[str, float | None] | None = None,
    chosen: pd.Series | int | None = None,
    teacher: Mapping[str, float] | None = None,
    objectives: Mapping[str, str | Direction] | None = None,
) -> Path:
    """Draw the trials, the Pareto front and the budget as a PNG.

    Feasible trials are filled dots, trials that missed the budget hollow grey ones, failed or
    pruned trials red crosses. Trials with no ``y`` measured (a candidate that missed the budget is
    never fine-tuned) sit on the bottom edge at their ``x``. The front is a step line, the budget a
    dashed line, the chosen trial is circled and labelled, the teacher is a star.

    Args:
        df: trials, one row per trial.
        path: the PNG to write (atomically).
        x, y, constraints, chosen, teacher, objectives: as in :func:`pareto_plot_data`.

    Returns:
        The path written.

    Raises:
        ValueError: as :func:`pareto_plot_data`.

    Example:
        >>> import tempfile, pathlib
        >>> df = pd.DataFrame({"number": [0, 1], "state": ["COMPLETE"] * 2,
        ...                    "accuracy": [97.0, 95.0], "latency_ms": [3.0, 2.0]})
        >>> out = plot_pareto(df, pathlib.Path(tempfile.mkdtemp()) / "pareto.png",
        ...                   constraints={"latency_ms": 2.5})
        >>> out.read_bytes()[:4] == b"\\x89PNG"
        True
    """
    data = pareto_plot_data(
        df, x=x, y=y, constraints=constraints, chosen=chosen, teacher=teacher,
        objectives=objectives,
    )
    with atomic_path(path) as tmp:
        _render_matplotlib(data, tmp)
    return Path(path)


def _render_matplotlib(data: ParetoPlotData, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure with its own Agg canvas: no pyplot global state, safe in threads and workers.
    fig = Figure(figsize=(8.0, 5.5), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x, y = data.x, data.y
    edge_rows: list[tuple[np.ndarray, dict[str, Any]]] = []  # drawn on the bottom edge later
    any_point = False

    def split(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        xs, ys = _xy(rows, x, y)
        both = ~np.isnan(xs) & ~np.isnan(ys)
        only_x = ~np.isnan(xs) & np.isnan(ys)
        return xs, ys, both, only_x

    # Feasible trials.
    xs, ys, both, _ = split(data.feasible)
    label = f"meets budget ({len(data.feasible)})" if data.has_budget else f"trials ({both.sum()})"
    if both.any():
        any_point = True
        ax.scatter(xs[both], ys[both], s=36, color=_C_FEASIBLE, alpha=0.85, zorder=3, label=label)

    # Trials that missed the budget: hollow grey, on the bottom edge when never fine-tuned.
    xs, ys, both, only_x = split(data.infeasible)
    style = dict(facecolors="none", edgecolors=_C_INFEASIBLE, linewidths=1.2, s=36, zorder=2)
    label = f"misses budget ({len(data.infeasible)})"
    if both.any():
        any_point = True
        ax.scatter(xs[both], ys[both], label=label, **style)
        label = None
    if only_x.any():
        edge_rows.append(
            (xs[only_x], dict(marker="o", markerfacecolor="none", markeredgecolor=_C_INFEASIBLE,
                              markersize=6, markeredgewidth=1.2, label=label))
        )

    # Failed / pruned trials: red crosses on the bottom edge (their metrics are not results).
    if len(data.failed):
        xs, _ = _xy(data.failed, x, y)
        label = f"failed / pruned ({len(data.failed)})"
        has_x = ~np.isnan(xs)
        if has_x.any():
            edge_rows.append(
                (xs[has_x], dict(marker="x", color=_C_FAILED, markersize=6, markeredgewidth=1.5,
                                 label=label))
            )
        else:
            # Nothing to place: keep the count in the legend with an empty proxy.
            ax.plot([], [], "x", color=_C_FAILED, label=label)

    # Pareto front.
    if len(data.front):
        fx, fy = _xy(data.front, x, y)
        names = ", ".join(data.front_objectives)
        if data.front_is_curve:
            # The best y attainable at a given x: after a point when x is minimised, before it when
            # x is maximised.
            where = "post" if data.front_objectives[x] is Direction.MIN else "pre"
            ax.step(fx, fy, where=where, color=_C_FRONT, linewidth=2.0, alpha=0.9, zorder=4,
                    label=f"Pareto front ({len(data.front)})")
            ax.scatter(fx, fy, s=60, color=_C_FRONT, edgecolors="black", linewidths=0.6, zorder=5)
        else:
            ax.scatter(fx, fy, s=70, facecolors="none", edgecolors=_C_FRONT, linewidths=1.8,
                       zorder=5, label=f"Pareto front over {names} ({len(data.front)})")

    # Teacher.
    teacher = data.teacher or {}
    if not _is_missing(teacher.get(x)) and not _is_missing(teacher.get(y)):
        any_point = True
        ax.scatter([teacher[x]], [teacher[y]], marker="*", s=260, color=_C_TEACHER,
                   edgecolors="black", linewidths=0.8, zorder=6,
                   label=f"teacher ({_fmt(y, teacher[y])} @ {_fmt(x, teacher[x])})")

    if not any_point:
        counts = ", ".join(
            f"{n} {what}" for n, what in (
                (len(data.failed), "failed / pruned"),
                (len(data.infeasible), "missed the budget"),
                (data.n_unfinished, "unfinished"),
            ) if n
        )
        ax.text(0.5, 0.5, f"No completed trial with a measured {y}"
                + (f"\n({counts})" if counts else ""),
                ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.35",
                zorder=9, bbox=dict(boxstyle="round,pad=0.5", facecolor="white", edgecolor="0.8"))
        ax.set_yticks([])  # an empty y range has no meaningful ticks

    # Autoscale now, so that the budget shading and edge markers can use the final limits.
    ax.autoscale_view()
    if edge_rows:
        # Make room at the bottom so edge markers never sit on real points.
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo - 0.08 * (hi - lo), hi)
        for xs_edge, kwargs in edge_rows:
            ax.plot(xs_edge, np.full(len(xs_edge), 0.025), linestyle="none",
                    transform=ax.get_xaxis_transform(), clip_on=False, zorder=3, **kwargs)
        ax.autoscale_view(scaley=False)

    # Budget lines, with the over-budget side lightly shaded.
    if data.x_limit is not None:
        xlo, xhi = ax.get_xlim()
        ax.axvline(data.x_limit, color=_C_BUDGET, linestyle="--", linewidth=1.3, zorder=1,
                   label=f"budget: {x} ≤ {_fmt(x, data.x_limit)}")
        if data.x_limit < xhi:
            ax.axvspan(max(data.x_limit, xlo), xhi, color=_C_BUDGET, alpha=0.05, zorder=0)
        ax.set_xlim(min(xlo, data.x_limit), max(xhi, data.x_limit))
    if data.y_limit is not None:
        ax.axhline(data.y_limit, color=_C_BUDGET, linestyle=":", linewidth=1.3, zorder=1,
                   label=f"budget: {y} ≤ {_fmt(y, data.y_limit)}")

    # Chosen trial: circled now, labelled last (the label avoids the points and the legend).
    label_at: tuple[tuple[float, float], str] | None = None
    if data.chosen is not None:
        cx = pd.to_numeric(pd.Series([data.chosen.get(x)]), errors="coerce").iloc[0]
        cy = pd.to_numeric(pd.Series([data.chosen.get(y)]), errors="coerce").iloc[0]
        if not (math.isnan(cx) or math.isnan(cy)):
            ax.scatter([cx], [cy], s=320, facecolors="none", edgecolors="black", linewidths=2.0,
                       zorder=7, label="chosen")
            number = data.chosen.get("number")
            tag = f"#{_fmt_plain(number)} " if not _is_missing(number) else ""
            label_at = ((float(cx), float(cy)), f"{tag}{_fmt(y, cy)} @ {_fmt(x, cx)}")

    if x in ("bops", "mmacs", "params"):
        xlo, xhi = ax.get_xlim()
        if xlo > 0 and xhi / xlo > 100:
            ax.set_xscale("log")
    ax.set_xlabel(data.x_label)
    ax.set_ylabel(data.y_label)
    ax.set_title(data.title, fontsize=12)
    ax.grid(True, color="0.9", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    if edge_rows:
        # Under the x label, anchored to it so that the constrained layout makes room for it.
        ax.annotate(
            f"Markers on the bottom edge: {y} not measured "
            "(missed the budget, so never fine-tuned; or failed / pruned).",
            xy=(0.5, 0.0), xycoords=("axes fraction", ax.xaxis.label), xytext=(0, -3),
            textcoords="offset points", ha="center", va="top", fontsize=7.5, color="0.4",
        )
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        order = sorted(range(len(labels)), key=lambda i: _legend_rank(labels[i]))
        ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="best",
                  fontsize=8.5, framealpha=0.92)
    if label_at is not None:
        # Lay the figure out first so that display positions are final.
        fig.canvas.draw()
        _place_label(fig, ax, *label_at, _drawn_points(ax, data, edge_rows))
    fig.savefig(path, format="png")


def _drawn_points(ax: Any, data: ParetoPlotData, edge_rows: list) -> np.ndarray:
    """Display coordinates of every marker drawn, for the label placement to avoid."""
    parts = []
    for rows in (data.feasible, data.infeasible, data.front):
        xs, ys = _xy(rows, data.x, data.y)
        ok = ~np.isnan(xs) & ~np.isnan(ys)
        parts.append(ax.transData.transform(np.column_stack([xs[ok], ys[ok]])))
    teacher = data.teacher or {}
    if not _is_missing(teacher.get(data.x)) and not _is_missing(teacher.get(data.y)):
        parts.append(ax.transData.transform([[teacher[data.x], teacher[data.y]]]))
    for xs, _ in edge_rows:
        edge = np.column_stack([xs, np.full(len(xs), 0.025)])
        parts.append(ax.get_xaxis_transform().transform(edge))
    parts = [p.reshape(-1, 2) for p in parts if len(p)]
    return np.concatenate(parts) if parts else np.zeros((0, 2))


def _place_label(fig: Any, ax: Any, xy: tuple[float, float], text: str,
                 points: np.ndarray) -> None:
    """Annotate ``xy`` with ``text`` where the box covers the fewest markers and not the legend.

    The figure must have been drawn (its layout done); ``points`` are in display coordinates.
    """
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    # Pin the legend where "best" put it, or the final draw could move it onto the label.
    legend = ax.get_legend()
    legend_box = None
    if legend is not None:
        legend_box = legend.get_window_extent(renderer)
        legend.set_loc(tuple(ax.transAxes.inverted().transform((legend_box.x0, legend_box.y0))))
    axes_box = ax.get_window_extent(renderer)
    style = dict(
        textcoords="offset points", va="center", fontsize=9, zorder=8,
        bbox=dict(boxstyle="round,pad=0.3", facecolor="white", edgecolor="0.3", alpha=0.95),
        arrowprops=dict(arrowstyle="-", color="0.3", linewidth=1.0, shrinkA=0, shrinkB=9),
    )
    best: tuple[float, Any] | None = None
    for distance in (32.0, 55.0, 85.0):
        for angle in np.deg2rad(np.arange(15, 360, 30)):
            dx, dy = distance * math.cos(angle), distance * math.sin(angle)
            ha = "left" if dx > 8 else "right" if dx < -8 else "center"
            ann = ax.annotate(text, xy, xytext=(dx, dy), ha=ha, **style)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer).padded(5)
            inside = (
                box.x0 >= axes_box.x0 and box.x1 <= axes_box.x1
                and box.y0 >= axes_box.y0 and box.y1 <= axes_box.y1
            )
            covered = int(np.sum(
                (points[:, 0] >= box.x0) & (points[:, 0] <= box.x1)
                & (points[:, 1] >= box.y0) & (points[:, 1] <= box.y1)
            )) if len(points) else 0
            score = (0 if inside else 1000) + 10 * covered + distance / 10
            if legend_box is not None and box.overlaps(legend_box):
                score += 500
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, ann)
            else:
                ann.remove()


_LEGEND_ORDER = ("meets budget", "trials", "misses budget", "failed", "pareto", "chosen",
                 "teacher", "budget")


def _legend_rank(label: str) -> int:
    text = label.lower()
    return next((i for i, key in enumerate(_LEGEND_ORDER) if text.startswith(key)),
                len(_LEGEND_ORDER))


# --------------------------------------------------------------------------------------------
# plotly back end
# --------------------------------------------------------------------------------------------


def _hover_text(row: pd.Series, category: str) -> str:
    number = row.get("number")
    if category == "teacher":
        lines = ["<b>teacher</b> (uncompressed)"]
    elif _is_missing(number):
        lines = [f"<b>trial</b> ({category})"]
    else:
        lines = [f"<b>trial #{_fmt_plain(number)}</b> ({category})"]
    acc, se = row.get("accuracy"), row.get("accuracy_se")
    if "accuracy" in row.index:
        if _is_missing(acc):
            lines.append("accuracy: not measured")
        elif _is_missing(se):
            lines.append(f"accuracy: {float(acc):.2f}%")
        else:
            lines.append(f"accuracy: {float(acc):.2f} ± {float(se):.2f}%")
    for col in ("latency_ms", "size_mb", "mmacs", "bops", "params", "finetune_s"):
        if col in row.index:
            lines.append(f"{_UNITS[col][0].lower()}: {_fmt(col, row.get(col))}")
    params = [c for c in row.index if str(c).startswith(_PARAM_PREFIX)]
    if params:
        lines.append("<i>configuration</i>")
        lines += [f"{c[len(_PARAM_PREFIX):]} = {_fmt_plain(row.get(c))}" for c in params]
    error = row.get("error")
    if not _is_missing(error) and str(error).strip():
        text = str(error).strip().replace("<", "&lt;")
        lines.append(f"error: {text[:120]}{'…' if len(text) > 120 else ''}")
    return "<br>".join(lines)


def plot_pareto_html(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    x: str = "latency_ms",
    y: str = "accuracy",
    constraints: Mapping[str, float | None] | None = None,
    chosen: pd.Series | int | None = None,
    teacher: Mapping[str, float] | None = None,
    objectives: Mapping[str, str | Direction] | None = None,
) -> Path:
    """Write an interactive, self-contained (offline) HTML Pareto plot.

    Hovering a point shows the trial number, accuracy ± standard error, latency, size, MACs and
    every sampled ``param_*`` value. Two menus pick the columns on the x and y axes; the budget
    line follows the axis it limits. Feasible, infeasible and failed trials are separate traces
    that the legend toggles. Trials with no measured y value sit on a row just below the smallest
    measured one (at their x); trials with no measured x value are not drawn.

    Args:
        df: trials, one row per trial.
        path: the HTML file to write (atomically); plotly.js is embedded, so it works offline.
        x, y, constraints, chosen, teacher, objectives: as in :func:`pareto_plot_data`.

    Returns:
        The path written.

    Raises:
        ValueError: as :func:`pareto_plot_data`.

    Example:
        >>> import tempfile, pathlib
        >>> df = pd.DataFrame({"number": [0], "state": ["COMPLETE"], "accuracy": [97.0],
        ...                    "latency_ms": [3.0], "param_bits.fc": [8]})
        >>> out = plot_pareto_html(df, pathlib.Path(tempfile.mkdtemp()) / "pareto.html")
        >>> "bits.fc = 8" in out.read_text()
        True
    """
    data = pareto_plot_data(
        df, x=x, y=y, constraints=constraints, chosen=chosen, teacher=teacher,
        objectives=objectives,
    )
    axes = [c for c in AXIS_COLUMNS if c in df.columns]
    for col in (y, x):
        if col not in axes:
            axes.insert(0, col)
    fig = _render_plotly(data, df, axes)
    html = fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False},
                       default_height="95vh")  # fill the browser window
    return write_text_atomic(path, html)


def _render_plotly(data: ParetoPlotData, df: pd.DataFrame, axes: list[str]) -> Any:
    import plotly.graph_objects as go

    # Where unmeasured values go on each axis: a little below the smallest measured value.
    floors: dict[str, float] = {}
    for col in axes:
        values = pd.to_numeric(df[col], errors="coerce").dropna()
        if data.teacher and not _is_missing(data.teacher.get(col)):
            values = pd.concat([values, pd.Series([float(data.teacher[col])])])
        if values.empty:
            floors[col] = 0.0
        else:
            lo, hi = float(values.min()), float(values.max())
            floors[col] = lo - (0.06 * (hi - lo) if hi > lo else max(abs(lo) * 0.05, 1.0))

    def column(rows: pd.DataFrame, col: str, axis: str) -> list[float | None]:
        values = pd.to_numeric(rows[col], errors="coerce") if col in rows else pd.Series(
            np.nan, index=rows.index
        )
        if axis == "y":  # unmeasured: on a row of their own below the measured values
            return values.fillna(floors[col]).astype(float).tolist()
        # no invented x position: a trial with nothing measured on x is not drawn (None)
        return [None if math.isnan(v) else v for v in values.astype(float).tolist()]

    # (name, rows, category for the hover, marker)
    layers: list[tuple[str, pd.DataFrame, str, dict[str, Any]]] = []
    feasible_name = "meets budget" if data.has_budget else "complete"
    layers.append((f"{feasible_name} ({len(data.feasible)})", data.feasible, feasible_name,
                   dict(color=_C_FEASIBLE, size=9, opacity=0.85)))
    if len(data.infeasible):
        layers.append((f"misses budget ({len(data.infeasible)})", data.infeasible, "misses budget",
                       dict(color="rgba(0,0,0,0)", size=9,
                            line=dict(color=_C_INFEASIBLE, width=1.5))))
    if len(data.failed):
        layers.append((f"failed / pruned ({len(data.failed)})", data.failed, "failed / pruned",
                       dict(color=_C_FAILED, size=9, symbol="x")))
    if len(data.front):
        names = ", ".join(f"{c} {'↑' if d is Direction.MAX else '↓'}"
                          for c, d in data.front_objectives.items())
        layers.append((f"Pareto front ({names})", data.front, "Pareto front",
                       dict(color="rgba(0,0,0,0)", size=15,
                            line=dict(color=_C_FRONT, width=2.5))))
    if data.chosen is not None:
        chosen = data.chosen.to_frame().T
        number = data.chosen.get("number")
        tag = f"#{_fmt_plain(number)}" if not _is_missing(number) else ""
        layers.append((f"chosen {tag}".strip(), chosen, "chosen",
                       dict(color="rgba(0,0,0,0)", size=22, line=dict(color="black", width=2.5))))
    teacher = data.teacher or {}
    if not _is_missing(teacher.get(data.x)) and not _is_missing(teacher.get(data.y)):
        layers.append(("teacher", pd.DataFrame([data.teacher]), "teacher",
                       dict(color=_C_TEACHER, size=18, symbol="star",
                            line=dict(color="black", width=1))))

    fig = go.Figure()
    for name, rows, category, marker in layers:
        fig.add_trace(go.Scatter(
            x=column(rows, data.x, "x"), y=column(rows, data.y, "y"), mode="markers", name=name,
            marker=marker, text=[_hover_text(r, category) for _, r in rows.iterrows()],
            hovertemplate="%{text}<extra></extra>",
        ))

    def budget_shape(col: str, vertical: bool) -> dict[str, Any]:
        limit = data.budget.get(col)
        key = "x" if vertical else "y"
        return {
            f"shapes[{0 if vertical else 1}].{key}0": limit if limit is not None else 0,
            f"shapes[{0 if vertical else 1}].{key}1": limit if limit is not None else 0,
            f"shapes[{0 if vertical else 1}].visible": limit is not None,
            f"shapes[{0 if vertical else 1}].label.text":
                f"budget {_fmt(col, limit)}" if limit is not None else "",
        }

    # Shape 0 limits x, shape 1 limits y; the axis menus move and hide them.
    for vertical, col in ((True, data.x), (False, data.y)):
        limit = data.budget.get(col)
        value = limit if limit is not None else 0
        fig.add_shape(
            type="line", visible=limit is not None,
            x0=value if vertical else 0, x1=value if vertical else 1,
            y0=0 if vertical else value, y1=1 if vertical else value,
            xref="x" if vertical else "paper", yref="paper" if vertical else "y",
            line=dict(color=_C_BUDGET, dash="dash", width=1.5),
            label=dict(text=f"budget {_fmt(col, limit)}" if limit is not None else "",
                       textposition="end", font=dict(color=_C_BUDGET, size=11)),
        )

    def menu(axis: str, current: str, position: float) -> dict[str, Any]:
        buttons = []
        for col in axes:
            args = {axis: [column(rows, col, axis) for _, rows, _, _ in layers]}
            layout = {f"{axis}axis.title.text": _axis_label(col)}
            layout.update(budget_shape(col, vertical=axis == "x"))
            buttons.append(dict(label=_axis_label(col), method="update", args=[args, layout]))
        return dict(buttons=buttons, direction="down", active=axes.index(current), x=position,
                    xanchor="left", y=1.13, yanchor="top", showactive=True)

    # the budget on a line of its own: one long line runs under plotly's toolbar
    budget = f"<br><span style='font-size:12px;color:#555'>budget: {data.budget_text}</span>" if (
        data.budget) else ""
    fig.update_layout(
        title=dict(text=data.title + budget, x=0.5, y=0.98, yanchor="top", font=dict(size=15)),
        xaxis_title=data.x_label,
        yaxis_title=data.y_label,
        template="plotly_white",
        hoverlabel=dict(align="left"),
        legend=dict(title="click to hide / show", groupclick="toggleitem"),
        margin=dict(t=110, b=95),
        updatemenus=[menu("x", data.x, 0.07), menu("y", data.y, 0.47)],
        annotations=[
            dict(text="x axis", x=0.0, y=1.11, xref="paper", yref="paper", showarrow=False,
                 xanchor="left"),
            dict(text="y axis", x=0.40, y=1.11, xref="paper", yref="paper", showarrow=False,
                 xanchor="left"),
        ],
    )
    if not (len(data.feasible) or len(data.infeasible)):
        counts = ", ".join(f"{n} {what}" for n, what in (
            (len(data.failed), "failed / pruned"), (data.n_unfinished, "unfinished")) if n)
        fig.add_annotation(
            text=f"No completed trial with a measured {data.y}" + (f" ({counts})" if counts else ""),
            x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
            font=dict(size=15, color="#555"), bgcolor="white", bordercolor="#ccc", borderpad=8,
        )
    if len(data.infeasible) or len(data.failed):
        # the PNG's footnote, under the x axis title
        fig.add_annotation(
            text="Points on the lowest row have no measured y value (missed the budget, so never "
                 "fine-tuned; or failed / pruned). Trials with no measured x value are not drawn.",
            x=0.5, y=0, xref="paper", yref="paper", yshift=-72, showarrow=False,
            font=dict(size=11, color="#777"),
        )
    return fig


# --------------------------------------------------------------------------------------------
# rich tables
# --------------------------------------------------------------------------------------------

_STATE_STYLE = {"COMPLETE": "green", "FAIL": "red", "PRUNED": "yellow", "RUNNING": "cyan"}


def _accuracy_cell(row: pd.Series) -> str:
    acc, se = row.get("accuracy"), row.get("accuracy_se")
    if _is_missing(acc):
        return "—"
    return f"{float(acc):.2f}" + ("" if _is_missing(se) else f" ± {float(se):.2f}")


def trials_table(df: pd.DataFrame) -> Table:
    """A rich table of every trial: state, accuracy ± se, latency, size, MACs, budget, error.

    Args:
        df: trials, one row per trial (absent columns are skipped).

    Returns:
        A :class:`rich.table.Table`, rows ordered by ``number``.

    Example:
        >>> df = pd.DataFrame({"number": [0], "state": ["COMPLETE"], "accuracy": [97.0]})
        >>> trials_table(df).row_count
        1
    """
    from rich.table import Table

    table = Table(title=f"Trials ({len(df)})", header_style="bold")
    metric_cols = [
        ("latency_ms", "latency ms", lambda v: f"{float(v):.3g}"),
        ("size_mb", "size MB", lambda v: f"{float(v):.3g}"),
        ("mmacs", "MMACs", lambda v: f"{float(v):.4g}"),
        ("finetune_s", "fine-tune s", lambda v: f"{float(v):.1f}"),
    ]
    present = [(c, h, f) for c, h, f in metric_cols if c in df.columns]
    table.add_column("#", justify="right")
    if "state" in df.columns:
        table.add_column("state")
    if "accuracy" in df.columns:
        table.add_column("accuracy %", justify="right")
    for _, header, _ in present:
        table.add_column(header, justify="right")
    if "meets_budget" in df.columns:
        table.add_column("budget", justify="center")
    if "error" in df.columns:
        table.add_column("error", overflow="fold", max_width=50)
    rows = df
    if "number" in df.columns:
        rows = df.sort_values("number", kind="stable")
    for _, row in rows.iterrows():
        cells = [_fmt_plain(row.get("number"))]
        if "state" in df.columns:
            state = str(row.get("state"))
            style = _STATE_STYLE.get(state.upper())
            cells.append(f"[{style}]{state}[/{style}]" if style else state)
        if "accuracy" in df.columns:
            cells.append(_accuracy_cell(row))
        for col, _, fmt in present:
            value = row.get(col)
            cells.append("—" if _is_missing(value) else fmt(value))
        if "meets_budget" in df.columns:
            meets = row.get("meets_budget")
            cells.append("—" if _is_missing(meets) else ("[green]✓[/green]" if bool(meets)
                                                         else "[red]✗[/red]"))
        if "error" in df.columns:
            error = row.get("error")
            text = "" if _is_missing(error) else str(error).strip()
            cells.append(text[:200] + ("…" if len(text) > 200 else ""))
        table.add_row(*cells)
    return table


def front_table(
    df: pd.DataFrame, objectives: Mapping[str, str | Direction], *, params: bool = False
) -> Table:
    """A rich table of the Pareto-optimal trials, with their metrics and sampled values.

    Args:
        df: trials, one row per trial.
        objectives: column -> ``"max"`` / ``"min"``, as in :func:`autoshrink.frontier.pareto_front`.
        params: also show the sampled ``param_*`` values (wide: one column per parameter).

    Returns:
        A :class:`rich.table.Table`, best first by the first objective.

    Raises:
        ValueError: as :func:`autoshrink.frontier.pareto_front`.

    Example:
        >>> df = pd.DataFrame({"accuracy": [90, 95, 80], "latency_ms": [2.0, 4.0, 3.0]})
        >>> front_table(df, {"accuracy": "max", "latency_ms": "min"}).row_count
        2
    """
    from rich.table import Table

    front = pareto_front(df, objectives)
    parsed = {c: Direction.parse(d, column=c) for c, d in objectives.items()}
    arrows = ", ".join(f"{_header(c).split()[0]} {'↑' if d is Direction.MAX else '↓'}"
                       for c, d in parsed.items())
    table = Table(title=f"Pareto front ({arrows}): {len(front)} of {len(df)} trials",
                  header_style="bold")
    columns = _front_columns(front, list(parsed), params)
    for col in columns:
        style = "bold" if col in parsed else None
        table.add_column(_header(col), justify="right", style=style)
    for _, row in front.iterrows():
        table.add_row(*[_cell(row, col) for col in columns])
    return table


def _front_columns(front: pd.DataFrame, objectives: Sequence[str], params: bool = True) -> list[str]:
    columns = ["number"] if "number" in front.columns else []  # shown as "#"
    columns += [c for c in objectives if c not in columns]
    columns += [c for c in ("accuracy", "latency_ms", "size_mb", "mmacs", "meets_budget")
                if c in front.columns and c not in columns]
    return columns + (_param_columns(front) if params else [])


# column -> header of the front tables (terminal and report.md): the unit, not the suffix
_HEADERS = {"number": "trial", "accuracy": "accuracy %", "latency_ms": "latency ms",
            "size_mb": "size MB", "mmacs": "MMACs", "meets_budget": "budget"}
_DECIMALS = {"latency_ms": 3, "size_mb": 3, "mmacs": 2}


def _header(col: str) -> str:
    if col in _HEADERS:
        return _HEADERS[col]
    return col[len(_PARAM_PREFIX):] if col.startswith(_PARAM_PREFIX) else col


def _cell(row: pd.Series, col: str) -> str:
    if col == "accuracy":
        return _accuracy_cell(row)
    if col == "number":
        return f"#{_fmt_plain(row.get(col))}"
    value = _number(row.get(col))
    if value is not None and col in _DECIMALS:
        # fixed decimals per column, so that values line up and compare at a glance
        return f"{value:.{_DECIMALS[col]}f}"
    return _fmt_plain(row.get(col))


def plan_table(layers: Sequence[Mapping[str, Any]], *, title: str = "Compression plan") -> Table:
    """A rich table of a compression plan, one row per layer: bits, channels before → after, the
    share of the compressed model's MACs (with a bar scaled to the largest share).

    Args:
        layers: dicts with ``layer``, ``bits``, ``channels_before``, ``channels_after`` and
            ``latency_share`` (the layer's fraction 0-1 of the compressed model's MACs, a proxy for
            its share of the latency; None if unknown); ``mmacs`` is shown when present.
        title: the table's title.

    Returns:
        A :class:`rich.table.Table`.

    Raises:
        ValueError: a dict lacks one of the keys.

    Example:
        >>> plan_table([{"layer": "fc", "bits": 8, "channels_before": 64,
        ...              "channels_after": 48, "latency_share": 0.1}]).row_count
        1
    """
    from rich.table import Table

    required = ("layer", "bits", "channels_before", "channels_after", "latency_share")
    for i, layer in enumerate(layers):
        missing = [k for k in required if k not in layer]
        if missing:
            raise ValueError(
                f"layers[{i}] has no {missing[0]!r}; each layer needs the keys {list(required)}, "
                f"got {sorted(layer)}"
            )
    show_macs = any(_number(layer.get("mmacs")) is not None for layer in layers)
    shares = [_number(layer["latency_share"]) for layer in layers]
    largest = max((v for v in shares if v is not None), default=0.0)
    table = Table(title=title, header_style="bold")
    table.add_column("layer")
    table.add_column("bits", justify="right")
    table.add_column("channels", justify="right")
    table.add_column("kept", justify="right")
    if show_macs:
        table.add_column("MMACs", justify="right")
    table.add_column("share of MACs")
    for layer, share in zip(layers, shares, strict=True):
        bits = layer["bits"]
        before, after = layer["channels_before"], layer["channels_after"]
        bits_cell = f"[cyan]{bits}[/cyan]" if str(bits) != "32" else f"[dim]{bits}[/dim]"
        if _is_missing(before) or _is_missing(after):
            channels, kept = "—", "—"
        else:
            pruned = after != before
            channels = f"{before} → [yellow]{after}[/yellow]" if pruned else f"{before} → {after}"
            kept = f"{100.0 * float(after) / float(before):.0f}%" if float(before) else "—"
        if share is None:
            share_cell = "—"
        else:
            width = round(10 * share / largest) if largest > 0 else 0  # fits 80 columns
            share_cell = f"{100.0 * share:5.1f}% " + "█" * width
        row = [str(layer["layer"]), bits_cell, channels, kept]
        if show_macs:
            macs = _number(layer.get("mmacs"))
            row.append("—" if macs is None else f"{macs:.3g}")
        table.add_row(*row, share_cell)
    return table


def _ratio_text(ratio: float, col: str) -> str:
    """``3.40× faster`` / ``1.22× slower``: teacher / trial, said the way that reads as > 1."""
    better, worse = {"latency_ms": ("faster", "slower"), "size_mb": ("smaller", "larger")}.get(
        col, ("fewer", "more"))
    return f"{ratio:.2f}× {better}" if ratio >= 1 else f"{1 / ratio:.2f}× {worse}"


def nearest_table(nearest: pd.DataFrame, constraints: Mapping[str, float | None]) -> Table:
    """A rich table of the trials closest to the budget and what each would have to change.

    Args:
        nearest: rows from :func:`autoshrink.frontier.nearest_feasible`.
        constraints: column -> upper limit.

    Returns:
        A :class:`rich.table.Table`, one row per trial, in the given order.

    Example:
        >>> df = pd.DataFrame({"number": [3], "latency_ms": [6.0], "accuracy": [None]})
        >>> nearest_table(df, {"latency_ms": 5.0}).row_count
        1
    """
    from rich.table import Table

    limits = {str(c): float(v) for c, v in constraints.items() if v is not None}
    # accuracy only when measured: a candidate that missed the budget is never fine-tuned
    measured = "accuracy" in nearest.columns and nearest["accuracy"].notna().any()
    cols = [c for c in ("accuracy", *limits) if c in nearest.columns and (c != "accuracy" or measured)]
    table = Table(title="Closest to the budget", header_style="bold")
    table.add_column("trial", justify="right")
    for col in cols:
        table.add_column(_header(col), justify="right")
    table.add_column("what would have to change", overflow="fold")
    for _, row in nearest.iterrows():
        table.add_row(_cell(row, "number"), *[_cell(row, c) for c in cols],
                      _what_to_change(row, limits))
    return table


def chosen_table(chosen: pd.Series, teacher: Mapping[str, Any]) -> Table:
    """A rich table comparing the chosen trial with the teacher: accuracy, latency, size, MACs.

    Args:
        chosen: the chosen trial's row.
        teacher: the teacher's figures (``accuracy``, ``latency_ms`` compiled fp32,
            ``latency_ms_eager``, ``size_mb``, ``mmacs``); absent ones are shown as "—".

    Returns:
        A :class:`rich.table.Table` without borders.

    Example:
        >>> row = pd.Series({"number": 2, "accuracy": 97.0, "latency_ms": 2.0, "size_mb": 1.0})
        >>> chosen_table(row, {"accuracy": 98.0, "latency_ms": 6.0}).row_count
        4
    """
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False)
    table.add_column("")
    table.add_column(f"trial #{_fmt_plain(chosen.get('number'))}", justify="right")
    table.add_column("teacher", justify="right")
    table.add_column("change")
    for col in ("accuracy", "latency_ms", "size_mb", "mmacs"):
        c, t = _number(chosen.get(col)), _number(teacher.get(col))
        mine = _cell(chosen, col) if col != "accuracy" else _accuracy_cell(chosen)
        theirs = "—" if t is None else (f"{t:.2f}" if col == "accuracy" else _cell(pd.Series(teacher), col))
        change = ""
        if c is not None and t is not None:
            if col == "accuracy":
                change = f"{t - c:.2f} points lower" if t >= c else f"{c - t:.2f} points higher"
            elif c > 0 and round(t / c, 2) != 1:
                change = _ratio_text(t / c, col)
            else:
                change = "same"
        if col == "latency_ms":
            theirs += " fp32 compiled"
        table.add_row(_header(col), mine, theirs, change)
        eager = _number(teacher.get("latency_ms_eager"))
        if col == "latency_ms" and eager is not None and c:
            # the teacher as most people run it: a row of its own, so the table stays narrow
            table.add_row("", "", f"{_cell(pd.Series({col: eager}), col)} fp32 eager", _ratio_text(eager / c, col))
    return table


# --------------------------------------------------------------------------------------------
# markdown report
# --------------------------------------------------------------------------------------------


def _md_escape(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
              right: Sequence[bool] | None = None) -> str:
    """A GitHub-flavoured Markdown table; ``right`` marks right-aligned (numeric) columns."""
    right = right if right is not None else [False] * len(headers)
    lines = [
        "| " + " | ".join(_md_escape(h) for h in headers) + " |",
        "| " + " | ".join("---:" if r else "---" for r in right) + " |",
    ]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: Any) -> float | None:
    if _is_missing(value):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _what_to_change(row: pd.Series, limits: Mapping[str, float]) -> str:
    needs = []
    for col, limit in limits.items():
        value = _number(row.get(col))
        if value is None:
            needs.append(f"{col} not measured")
        elif value > limit:
            cut = 100.0 * (1.0 - limit / value) if value > 0 else float("nan")
            needs.append(
                f"needs {cut:.0f}% lower {col} ({_fmt(col, value)} → ≤ {_fmt(col, limit)})"
            )
    return "; ".join(needs) if needs else "within every limit"


def write_report_md(
    path: str | os.PathLike[str],
    *,
    teacher: Mapping[str, Any],
    chosen: pd.Series | None,
    front: pd.DataFrame,
    constraints: Mapping[str, float | None] | None,
    plot_name: str = "pareto.png",
    nearest: pd.DataFrame | None = None,
    baseline: tuple[pd.Series, str] | None = None,
    ties: pd.DataFrame | None = None,
) -> Path:
    """Write a Markdown report: budget, teacher, chosen model and its gains, the front, the plot.

    When ``chosen`` is None the report says plainly that no trial meets the budget and lists the
    ``nearest`` trials (from :func:`autoshrink.frontier.nearest_feasible`) with what each would
    have to change.

    Args:
        path: the ``.md`` file to write (atomically).
        teacher: the uncompressed model's figures, e.g. ``{"accuracy": 97.5, "latency_ms": 12.0,
            "size_mb": 8.1}``.
        chosen: the selected trial's row, or None.
        front: the Pareto-optimal rows.
        constraints: column -> upper limit.
        plot_name: the plot's path relative to the report (linked as an image).
        nearest: the trials closest to the budget, shown when nothing meets it.
        baseline: the hand baseline's row and a description (see
            :attr:`autoshrink.SearchResult.baseline`): the chosen model is compared with it.
        ties: trials as accurate as the chosen one within its standard error and cheaper to run
            (:meth:`autoshrink.SearchResult.near_ties`), pointed out below it.

    Returns:
        The path written.

    Example:
        >>> import tempfile, pathlib
        >>> out = write_report_md(pathlib.Path(tempfile.mkdtemp()) / "report.md",
        ...                       teacher={"accuracy": 97.5, "latency_ms": 12.0}, chosen=None,
        ...                       front=pd.DataFrame(), constraints={"latency_ms": 5.0})
        >>> "No trial meets the budget" in out.read_text()
        True
    """
    limits = {str(c): float(v) for c, v in (constraints or {}).items() if v is not None}
    out: list[str] = ["# autoshrink report", ""]

    out += ["## Budget", ""]
    if limits:
        out += [f"- `{col}` ≤ {_fmt(col, lim)}" for col, lim in limits.items()]
    else:
        out.append("No budget: the most accurate trial is chosen.")
    out.append("")

    metrics = [c for c in ("accuracy", "latency_ms", "size_mb", "mmacs", "bops", "params")
               if c in teacher or (chosen is not None and c in chosen.index)]
    out += ["## Teacher (uncompressed)", ""]
    shown = [c for c in metrics if c in teacher]
    if shown:
        out.append(_md_table([_UNITS[c][0] for c in shown],
                             [[_fmt(c, teacher.get(c)) for c in shown]], [True] * len(shown)))
    else:
        out.append("No teacher figures were recorded.")
    out.append("")

    if chosen is not None:
        out += _chosen_section(chosen, teacher, metrics)
        if baseline is not None:
            out += [baseline_text(chosen, *baseline), ""]
        if ties is not None and len(ties):
            out += [near_ties_text(chosen, ties, run=str(Path(path).parent)), ""]
    else:
        out += _nothing_meets_section(limits, nearest)

    out += ["## Pareto front", ""]
    if front is None or front.empty:
        out.append("No completed trial with measured objectives.")
    else:
        columns = _front_columns(front, [])
        headers = [_header(c) for c in columns]
        rows = [[_cell(row, c) for c in columns] for _, row in front.iterrows()]
        right = [not c.startswith(_PARAM_PREFIX) for c in columns]
        out.append(_md_table(headers, rows, right))
    out += ["", f"![Pareto front: accuracy vs latency of every trial]({plot_name})", ""]
    return write_text_atomic(path, "\n".join(out))


def baseline_text(chosen: pd.Series, baseline: pd.Series, how: str) -> str:
    """One sentence: the chosen trial against the hand baseline (accuracy and latency).

    Example:
        >>> baseline_text(pd.Series({"number": 7, "accuracy": 94.5, "latency_ms": 1.4}),
        ...               pd.Series({"number": 0, "accuracy": 93.9, "latency_ms": 1.36}), "uniform int8")
        'Against the hand baseline (trial #0, uniform int8): +0.60 points, 1.36 → 1.40 ms.'
    """
    if int(chosen.get("number")) == int(baseline.get("number")):
        return (f"The chosen model is the hand baseline ({how}): no trial of this search beat it. "
                "More trials may.")
    gain = float(chosen["accuracy"]) - float(baseline["accuracy"])
    text = f"Against the hand baseline (trial #{int(baseline['number'])}, {how}): {gain:+.2f} points"
    lb, lc = _number(baseline.get("latency_ms")), _number(chosen.get("latency_ms"))
    if lb is not None and lc is not None:
        text += f", {lb:.2f} → {lc:.2f} ms"
    return text + "."


def near_ties_text(chosen: pd.Series, ties: pd.DataFrame, run: str = "RUN") -> str:
    """One sentence pointing at trials as accurate as the chosen one within noise, but cheaper
    (``run``: the run folder, as the export command should name it).

    Example:
        >>> chosen = pd.Series({"number": 0, "accuracy": 95.42, "accuracy_se": 0.31, "latency_ms": 2.25})
        >>> ties = pd.DataFrame({"number": [11], "accuracy": [95.40], "latency_ms": [1.63], "size_mb": [3.66]})
        >>> import textwrap
        >>> print(textwrap.fill(near_ties_text(chosen, ties), 90))
        Within one standard error (±0.31 points) of its accuracy and cheaper to run: trial #11
        (95.40%, 1.63 ms, 3.66 MB). Differences this small are noise of the validation set;
        `autoshrink export RUN --trial 11 -o OUT` exports it.
    """
    parts = []
    for _, row in ties.iterrows():
        figures = [_fmt(c, row.get(c)) for c in ("accuracy", "latency_ms", "size_mb")
                   if c in row.index and not _is_missing(row.get(c))]
        parts.append(f"trial #{_fmt_plain(row.get('number'))} ({', '.join(figures)})")
    first = _fmt_plain(ties.iloc[0].get("number"))
    return (f"Within one standard error (±{float(chosen['accuracy_se']):.2f} points) of its accuracy and "
            f"cheaper to run: {'; '.join(parts)}. Differences this small are noise of the validation set; "
            f"`autoshrink export {run} --trial {first} -o OUT` exports it.")


def _chosen_section(chosen: pd.Series, teacher: Mapping[str, Any], metrics: list[str]) -> list[str]:
    number = chosen.get("number")
    tag = f"trial #{_fmt_plain(number)}" if not _is_missing(number) else "chosen trial"
    out = [f"## Chosen model: {tag}", ""]
    rows, summary = [], []
    for col in metrics:
        t, c = _number(teacher.get(col)), _number(chosen.get(col))
        change = ""
        if t is not None and c is not None:
            if col == "accuracy":
                drop = t - c
                change = (f"{drop:.2f} points lower" if drop >= 0
                          else f"{-drop:.2f} points higher")
                summary.append(f"accuracy drop {drop:.2f} points")
            elif c > 0:
                ratio = t / c
                change = _ratio_text(ratio, col)
                if col == "latency_ms":
                    summary.insert(0, f"**{ratio:.2f}× speed-up**" if ratio >= 1
                                   else f"**{1 / ratio:.2f}× slower** than the teacher")
                elif col == "size_mb":
                    summary.insert(min(1, len(summary)), f"**{_ratio_text(ratio, col)}** on disk")
        value = _fmt(col, chosen.get(col))
        if col == "accuracy" and not _is_missing(chosen.get("accuracy_se")):
            value = f"{float(chosen['accuracy']):.2f} ± {float(chosen['accuracy_se']):.2f}%"
        rows.append([_UNITS[col][0], _fmt(col, teacher.get(col)), value, change])
    if summary:
        out += [", ".join(summary) + ".", ""]
    out += [_md_table(["", "teacher", "chosen", "change"], rows, [False, True, True, False]), ""]
    params = [c for c in chosen.index if str(c).startswith(_PARAM_PREFIX)]
    if params:
        out += ["### Configuration", ""]
        out.append(_md_table(["setting", "value"],
                             [[c[len(_PARAM_PREFIX):], _fmt_plain(chosen.get(c))] for c in params],
                             [False, True]))
        out.append("")
    return out


def _nothing_meets_section(limits: Mapping[str, float], nearest: pd.DataFrame | None) -> list[str]:
    if not limits:
        return ["## No model chosen", "",
                "No budget was set, and no trial completed with a measured accuracy.", ""]
    budget = ", ".join(f"`{c}` ≤ {_fmt(c, v)}" for c, v in limits.items())
    out = ["## No trial meets the budget", "",
           f"No completed trial met {budget}, so no model was chosen.", ""]
    if nearest is None or nearest.empty:
        out += ["No trial measured the constrained metrics, so there is nothing to compare.", ""]
        return out
    out += ["The trials closest to it, and what each would have to change:", ""]
    cols = [c for c in ("accuracy", *limits) if c in nearest.columns]
    rows = []
    for _, row in nearest.iterrows():
        number = row.get("number")
        rows.append([f"#{_fmt_plain(number)}" if not _is_missing(number) else "—"]
                    + [_fmt(c, row.get(c)) for c in cols]
                    + [_what_to_change(row, limits)])
    out.append(_md_table(["trial", *cols, "what would have to change"], rows,
                         [True] * (len(cols) + 1) + [False]))
    first = nearest.iloc[0]
    relaxed = [f"`{c}` ≤ {_fmt(c, _number(first.get(c)))}" for c, lim in limits.items()
               if _number(first.get(c)) is not None and _number(first.get(c)) > lim]
    out.append("")
    if relaxed:
        out.append(
            f"To accept trial #{_fmt_plain(first.get('number'))}, relax the budget to "
            f"{', '.join(relaxed)}; or widen the search space (fewer bits, more pruning) "
            "and search again."
        )
        out.append("")
    return out

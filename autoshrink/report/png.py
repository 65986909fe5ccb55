"""The Pareto plot as a PNG (matplotlib): draws a :class:`~autoshrink.report.records.ParetoPlotData`.

matplotlib is imported inside the drawing function, so importing this module stays light.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autoshrink._files import atomic_path
from autoshrink.frontier import Direction
from autoshrink.report.formatting import (
    C_BUDGET,
    C_FAILED,
    C_FEASIBLE,
    C_FRONT,
    C_INFEASIBLE,
    C_TEACHER,
    fmt_plain,
    fmt_value,
    is_missing,
    limit_text,
)
from autoshrink.report.records import ParetoPlotData, pareto_plot_data

__all__ = ["plot_pareto"]


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


def _xy(rows: pd.DataFrame, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        pd.to_numeric(rows[x], errors="coerce").to_numpy(dtype=float),
        pd.to_numeric(rows[y], errors="coerce").to_numpy(dtype=float),
    )


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
        ax.scatter(xs[both], ys[both], s=36, color=C_FEASIBLE, alpha=0.85, zorder=3, label=label)

    # Trials that missed the budget: hollow grey, on the bottom edge when never fine-tuned.
    xs, ys, both, only_x = split(data.infeasible)
    style = dict(facecolors="none", edgecolors=C_INFEASIBLE, linewidths=1.2, s=36, zorder=2)
    label = f"misses budget ({len(data.infeasible)})"
    if both.any():
        any_point = True
        ax.scatter(xs[both], ys[both], label=label, **style)
        label = None
    if only_x.any():
        edge_rows.append(
            (xs[only_x], dict(marker="o", markerfacecolor="none", markeredgecolor=C_INFEASIBLE,
                              markersize=6, markeredgewidth=1.2, label=label))
        )

    # Failed / pruned trials: red crosses on the bottom edge (their metrics are not results).
    if len(data.failed):
        xs, _ = _xy(data.failed, x, y)
        label = f"failed / pruned ({len(data.failed)})"
        has_x = ~np.isnan(xs)
        if has_x.any():
            edge_rows.append(
                (xs[has_x], dict(marker="x", color=C_FAILED, markersize=6, markeredgewidth=1.5,
                                 label=label))
            )
        else:
            # Nothing to place: keep the count in the legend with an empty proxy.
            ax.plot([], [], "x", color=C_FAILED, label=label)

    # Pareto front.
    if len(data.front):
        fx, fy = _xy(data.front, x, y)
        names = ", ".join(data.front_objectives)
        if data.front_is_curve:
            # The best y attainable at a given x: after a point when x is minimised, before it when
            # x is maximised.
            where = "post" if data.front_objectives[x] is Direction.MIN else "pre"
            ax.step(fx, fy, where=where, color=C_FRONT, linewidth=2.0, alpha=0.9, zorder=4,
                    label=f"Pareto front ({len(data.front)})")
            ax.scatter(fx, fy, s=60, color=C_FRONT, edgecolors="black", linewidths=0.6, zorder=5)
        else:
            ax.scatter(fx, fy, s=70, facecolors="none", edgecolors=C_FRONT, linewidths=1.8,
                       zorder=5, label=f"Pareto front over {names} ({len(data.front)})")

    # Re-timed trials: the gate figure (before the fine-tune, another graph) as a hollow marker,
    # linked to the deployed one the dot stands at.
    if x == "latency_ms_effective":
        shown = pd.concat([data.feasible, data.infeasible])
        if "latency_ms_deployed" in shown.columns:
            retimed = shown[pd.to_numeric(shown["latency_ms_deployed"], errors="coerce").notna()]
            gx, gy = _xy(retimed, "latency_ms", y)
            dx, _ = _xy(retimed, "latency_ms_deployed", y)
            ok = ~np.isnan(gx) & ~np.isnan(gy) & ~np.isnan(dx)
            if ok.any():
                for a, b, c in zip(gx[ok], dx[ok], gy[ok], strict=True):
                    ax.plot([a, b], [c, c], color="0.45", linewidth=0.8, zorder=2)
                ax.scatter(gx[ok], gy[ok], s=30, facecolors="none", edgecolors="0.35", linewidths=1.0,
                           zorder=2, label=f"gate timing of re-timed trials ({int(ok.sum())})")

    # Teacher.
    teacher = data.teacher or {}
    if not is_missing(teacher.get(x)) and not is_missing(teacher.get(y)):
        any_point = True
        ax.scatter([teacher[x]], [teacher[y]], marker="*", s=260, color=C_TEACHER,
                   edgecolors="black", linewidths=0.8, zorder=6,
                   label=f"teacher ({fmt_value(y, teacher[y])} @ {fmt_value(x, teacher[x])})")

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
        ax.axvline(data.x_limit, color=C_BUDGET, linestyle="--", linewidth=1.3, zorder=1,
                   label=f"budget: {limit_text(x, data.x_limit)}")
        if data.x_limit < xhi:
            ax.axvspan(max(data.x_limit, xlo), xhi, color=C_BUDGET, alpha=0.05, zorder=0)
        ax.set_xlim(min(xlo, data.x_limit), max(xhi, data.x_limit))
    if data.y_limit is not None:
        ax.axhline(data.y_limit, color=C_BUDGET, linestyle=":", linewidth=1.3, zorder=1,
                   label=f"budget: {limit_text(y, data.y_limit)}")

    # Chosen trial: circled now, labelled last (the label avoids the points and the legend).
    label_at: tuple[tuple[float, float], str] | None = None
    if data.chosen is not None:
        cx = pd.to_numeric(pd.Series([data.chosen.get(x)]), errors="coerce").iloc[0]
        cy = pd.to_numeric(pd.Series([data.chosen.get(y)]), errors="coerce").iloc[0]
        if not (math.isnan(cx) or math.isnan(cy)):
            ax.scatter([cx], [cy], s=320, facecolors="none", edgecolors="black", linewidths=2.0,
                       zorder=7, label="chosen")
            number = data.chosen.get("number")
            tag = f"#{fmt_plain(number)} " if not is_missing(number) else ""
            label_at = ((float(cx), float(cy)), f"{tag}{fmt_value(y, cy)} @ {fmt_value(x, cx)}")

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
    if not is_missing(teacher.get(data.x)) and not is_missing(teacher.get(data.y)):
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

"""The Pareto plot as interactive, self-contained HTML (plotly): draws a
:class:`~autoshrink.report.records.ParetoPlotData`, with menus to change the axes.

plotly is imported inside the drawing function, so importing this module stays light.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autoshrink._files import write_text_atomic
from autoshrink.frontier import Direction
from autoshrink.report.formatting import (
    AXIS_COLUMNS,
    C_BUDGET,
    C_FAILED,
    C_FEASIBLE,
    C_FRONT,
    C_INFEASIBLE,
    C_TEACHER,
    PARAM_PREFIX,
    UNITS,
    axis_label,
    fmt_plain,
    fmt_value,
    is_missing,
)
from autoshrink.report.records import ParetoPlotData, pareto_plot_data

__all__ = ["plot_pareto_html"]


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


def _hover_text(row: pd.Series, category: str) -> str:
    number = row.get("number")
    if category == "teacher":
        lines = ["<b>teacher</b> (uncompressed)"]
    elif is_missing(number):
        lines = [f"<b>trial</b> ({category})"]
    else:
        lines = [f"<b>trial #{fmt_plain(number)}</b> ({category})"]
    acc, se = row.get("accuracy"), row.get("accuracy_se")
    if "accuracy" in row.index:
        if is_missing(acc):
            lines.append("accuracy: not measured")
        elif is_missing(se):
            lines.append(f"accuracy: {float(acc):.2f}%")
        else:
            lines.append(f"accuracy: {float(acc):.2f} ± {float(se):.2f}%")
    for col in ("latency_ms", "size_mb", "mmacs", "bops", "params", "finetune_s"):
        if col in row.index:
            lines.append(f"{UNITS[col][0].lower()}: {fmt_value(col, row.get(col))}")
    params = [c for c in row.index if str(c).startswith(PARAM_PREFIX)]
    if params:
        lines.append("<i>configuration</i>")
        lines += [f"{c[len(PARAM_PREFIX):]} = {fmt_plain(row.get(c))}" for c in params]
    error = row.get("error")
    if not is_missing(error) and str(error).strip():
        text = str(error).strip().replace("<", "&lt;")
        lines.append(f"error: {text[:120]}{'…' if len(text) > 120 else ''}")
    return "<br>".join(lines)


def _render_plotly(data: ParetoPlotData, df: pd.DataFrame, axes: list[str]) -> Any:
    import plotly.graph_objects as go

    # Where unmeasured values go on each axis: a little below the smallest measured value.
    floors: dict[str, float] = {}
    for col in axes:
        values = pd.to_numeric(df[col], errors="coerce").dropna()
        if data.teacher and not is_missing(data.teacher.get(col)):
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
                   dict(color=C_FEASIBLE, size=9, opacity=0.85)))
    if len(data.infeasible):
        layers.append((f"misses budget ({len(data.infeasible)})", data.infeasible, "misses budget",
                       dict(color="rgba(0,0,0,0)", size=9,
                            line=dict(color=C_INFEASIBLE, width=1.5))))
    if len(data.failed):
        layers.append((f"failed / pruned ({len(data.failed)})", data.failed, "failed / pruned",
                       dict(color=C_FAILED, size=9, symbol="x")))
    if len(data.front):
        names = ", ".join(f"{c} {'↑' if d is Direction.MAX else '↓'}"
                          for c, d in data.front_objectives.items())
        layers.append((f"Pareto front ({names})", data.front, "Pareto front",
                       dict(color="rgba(0,0,0,0)", size=15,
                            line=dict(color=C_FRONT, width=2.5))))
    if data.chosen is not None:
        chosen = data.chosen.to_frame().T
        number = data.chosen.get("number")
        tag = f"#{fmt_plain(number)}" if not is_missing(number) else ""
        layers.append((f"chosen {tag}".strip(), chosen, "chosen",
                       dict(color="rgba(0,0,0,0)", size=22, line=dict(color="black", width=2.5))))
    teacher = data.teacher or {}
    if not is_missing(teacher.get(data.x)) and not is_missing(teacher.get(data.y)):
        layers.append(("teacher", pd.DataFrame([data.teacher]), "teacher",
                       dict(color=C_TEACHER, size=18, symbol="star",
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
                f"budget {fmt_value(col, limit)}" if limit is not None else "",
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
            line=dict(color=C_BUDGET, dash="dash", width=1.5),
            label=dict(text=f"budget {fmt_value(col, limit)}" if limit is not None else "",
                       textposition="end", font=dict(color=C_BUDGET, size=11)),
        )

    def menu(axis: str, current: str, position: float) -> dict[str, Any]:
        buttons = []
        for col in axes:
            args = {axis: [column(rows, col, axis) for _, rows, _, _ in layers]}
            layout = {f"{axis}axis.title.text": axis_label(col)}
            layout.update(budget_shape(col, vertical=axis == "x"))
            buttons.append(dict(label=axis_label(col), method="update", args=[args, layout]))
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

"""Terminal tables (rich): every trial, the Pareto front, a compression plan, the trials closest to
the budget, and the chosen model against the teacher.

rich is imported inside each function, so importing this module stays light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from autoshrink.frontier import Direction, pareto_front
from autoshrink.record import State
from autoshrink.report.formatting import (
    accuracy_cell,
    as_number,
    cell_text,
    fmt_plain,
    header_of,
    is_missing,
    ratio_text,
)
from autoshrink.report.records import budget_limits, compare_with_teacher, front_columns, near_misses

if TYPE_CHECKING:  # pragma: no cover - typing only
    from rich.table import Table

__all__ = ["chosen_table", "front_table", "nearest_table", "plan_table", "trials_table"]


_STATE_STYLE = {State.COMPLETE.value: "green", State.FAIL.value: "red", State.PRUNED.value: "yellow",
                State.RUNNING.value: "cyan"}


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
        cells = [fmt_plain(row.get("number"))]
        if "state" in df.columns:
            state = str(row.get("state"))
            style = _STATE_STYLE.get(state.upper())
            cells.append(f"[{style}]{state}[/{style}]" if style else state)
        if "accuracy" in df.columns:
            cells.append(accuracy_cell(row))
        for col, _, fmt in present:
            value = row.get(col)
            cells.append("—" if is_missing(value) else fmt(value))
        if "meets_budget" in df.columns:
            meets = row.get("meets_budget")
            cells.append("—" if is_missing(meets) else ("[green]✓[/green]" if bool(meets)
                                                         else "[red]✗[/red]"))
        if "error" in df.columns:
            error = row.get("error")
            text = "" if is_missing(error) else str(error).strip()
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
    # the deciding latency (deployed where re-timed, else the gate figure) is still "latency"
    arrows = ", ".join(f"{'latency' if c.startswith('latency_ms') else header_of(c).split()[0]} "
                       f"{'↑' if d is Direction.MAX else '↓'}" for c, d in parsed.items())
    table = Table(title=f"Pareto front ({arrows}): {len(front)} of {len(df)} trials",
                  header_style="bold")
    columns = front_columns(front, list(parsed), params)
    for col in columns:
        style = "bold" if col in parsed else None
        table.add_column(header_of(col), justify="right", style=style)
    for _, row in front.iterrows():
        table.add_row(*[cell_text(row, col) for col in columns])
    return table


def plan_table(layers: Sequence[Mapping[str, Any]], *, title: str = "Compression plan") -> Table:
    """A rich table of a compression plan, one row per layer: bits, channels before → after, the
    share of the compressed model's MACs (with a bar scaled to the largest share).

    Args:
        layers: dicts with ``layer``, ``bits``, ``channels_before``, ``channels_after`` and
            ``macs_share`` (the layer's fraction 0-1 of the compressed model's MACs, a proxy for
            its share of the latency; None if unknown); ``mmacs`` is shown when present.
        title: the table's title.

    Returns:
        A :class:`rich.table.Table`.

    Raises:
        ValueError: a dict lacks one of the keys.

    Example:
        >>> plan_table([{"layer": "fc", "bits": 8, "channels_before": 64,
        ...              "channels_after": 48, "macs_share": 0.1}]).row_count
        1
    """
    from rich.table import Table

    required = ("layer", "bits", "channels_before", "channels_after", "macs_share")
    for i, layer in enumerate(layers):
        missing = [k for k in required if k not in layer]
        if missing:
            raise ValueError(
                f"layers[{i}] has no {missing[0]!r}; each layer needs the keys {list(required)}, "
                f"got {sorted(layer)}"
            )
    show_macs = any(as_number(layer.get("mmacs")) is not None for layer in layers)
    shares = [as_number(layer["macs_share"]) for layer in layers]
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
        if is_missing(before) or is_missing(after):
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
            macs = as_number(layer.get("mmacs"))
            row.append("—" if macs is None else f"{macs:.3g}")
        table.add_row(*row, share_cell)
    return table


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

    limits = budget_limits(constraints)
    # accuracy only when measured: a candidate that missed the budget is never fine-tuned
    measured = "accuracy" in nearest.columns and nearest["accuracy"].notna().any()
    cols = [c for c in ("accuracy", *limits) if c in nearest.columns and (c != "accuracy" or measured)]
    table = Table(title="Closest to the budget", header_style="bold")
    table.add_column("trial", justify="right")
    for col in cols:
        table.add_column(header_of(col), justify="right")
    table.add_column("what would have to change", overflow="fold")
    for miss in near_misses(nearest, limits):
        table.add_row(cell_text(miss.row, "number"), *[cell_text(miss.row, c) for c in cols], miss.needs)
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
    table.add_column(f"trial #{fmt_plain(chosen.get('number'))}", justify="right")
    table.add_column("teacher", justify="right")
    table.add_column("change")
    for row in compare_with_teacher(chosen, teacher, ("accuracy", "latency_ms", "size_mb", "mmacs")):
        col, c, t = row.column, row.chosen_number, row.teacher_number
        mine = cell_text(chosen, col) if col != "accuracy" else accuracy_cell(chosen)
        theirs = "—" if t is None else (f"{t:.2f}" if col == "accuracy" else cell_text(pd.Series(teacher), col))
        change = ""
        if c is not None and t is not None:
            if col == "accuracy":
                change = row.accuracy_change
            elif row.ratio is not None and round(row.ratio, 2) != 1:
                change = ratio_text(row.ratio, col)
            else:
                change = "same"
        if col == "latency_ms":
            theirs += " fp32 compiled"
        table.add_row(header_of(col), mine, theirs, change)
        eager = as_number(teacher.get("latency_ms_eager"))
        if col == "latency_ms" and eager is not None and c:
            # the teacher as most people run it: a row of its own, so the table stays narrow
            table.add_row("", "", f"{cell_text(pd.Series({col: eager}), col)} fp32 eager", ratio_text(eager / c, col))
    return table

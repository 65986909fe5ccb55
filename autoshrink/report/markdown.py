"""``report.md``: budget, teacher, the chosen model and its gains (or the trials closest to the
budget), the Pareto front and a link to the plot; plus the sentences the terminal prints too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from autoshrink._files import write_text_atomic
from autoshrink.record import TrialAttr
from autoshrink.report.formatting import (
    PARAM_PREFIX,
    UNITS,
    as_number,
    cell_text,
    fmt_plain,
    fmt_value,
    header_of,
    is_missing,
    ratio_text,
)
from autoshrink.report.records import budget_limits, compare_with_teacher, front_columns, near_misses

__all__ = ["baseline_text", "finalist_lines", "left_alone_section", "near_ties_text", "write_report_md"]


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
    where: str | None = None,
    left_alone: Mapping[str, Any] | None = None,
    warnings: Sequence[str] = (),
    noise_note: str | None = None,
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
        where: where trials fine-tuned and latency was timed (:func:`autoshrink.report.where_text`),
            shown under the budget.
        left_alone: what the chosen trial's compression left alone and why
            (:meth:`autoshrink.SearchResult.left_alone`): listed under it.
        warnings: degradations of the run (a check that could not run, a finalist not re-timed,
            a noisy machine, no test split), listed in their own section.
        noise_note: "within the noise" when the budget lies inside the chosen model's spread.

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
    limits = budget_limits(constraints)
    out: list[str] = ["# autoshrink report", ""]

    out += ["## Budget", ""]
    if limits:
        out += [f"- `{col}` ≤ {fmt_value(col, lim)}" for col, lim in limits.items()]
    else:
        out.append("No budget: the most accurate trial is chosen.")
    out.append("")
    if where:
        out += [where, ""]
    if teacher.get("runtime"):  # which runtime timed every figure (the teacher's too, in fp32)
        out += [f"Every latency was timed in {teacher['runtime']} {teacher.get('runtime_version', '')}"
                f" at batch 1 with {teacher.get('latency_threads', '?')} thread(s); the teacher's in fp32.", ""]

    metrics = [c for c in ("accuracy", "latency_ms", "size_mb", "mmacs", "bops", "params")
               if c in teacher or (chosen is not None and c in chosen.index)]
    out += ["## Teacher (uncompressed)", ""]
    shown = [c for c in metrics if c in teacher]
    if shown:
        out.append(_md_table([UNITS[c][0] for c in shown],
                             [[fmt_value(c, teacher.get(c)) for c in shown]], [True] * len(shown)))
    else:
        out.append("No teacher figures were recorded.")
    out.append("")

    if chosen is not None:
        out += _chosen_section(chosen, teacher, metrics)
        out += finalist_lines(chosen)
        if noise_note:
            out += [f"**{noise_note}**", ""]
        if baseline is not None:
            out += [baseline_text(chosen, *baseline), ""]
        if ties is not None and len(ties):
            out += [near_ties_text(chosen, ties, run=str(Path(path).parent)), ""]
        out += left_alone_section(left_alone)
    else:
        out += _nothing_meets_section(limits, nearest)

    out += ["## Pareto front", ""]
    if front is None or front.empty:
        out.append("No completed trial with measured objectives.")
    else:
        columns = front_columns(front, [])
        headers = [header_of(c) for c in columns]
        rows = [[cell_text(row, c) for c in columns] for _, row in front.iterrows()]
        right = [not c.startswith(PARAM_PREFIX) for c in columns]
        out.append(_md_table(headers, rows, right))
    out += ["", f"![Pareto front: accuracy vs latency of every trial]({plot_name})", ""]
    if warnings:
        out += ["## Warnings", ""] + [f"- {line}" for line in warnings] + [""]
    return write_text_atomic(path, "\n".join(out))


def finalist_lines(chosen: pd.Series) -> list[str]:
    """What the chosen model was measured at after the trials: the test split (never used to
    choose), the shipped artifact re-timed beside its gate timing, and MACs as a lower bound.

    Example:
        >>> finalist_lines(pd.Series({"test_accuracy": 94.1, "test_accuracy_se": 0.4}))[0]
        '- test accuracy (the test split, never used to choose): **94.10 ± 0.40%**'
    """
    out = []
    acc, se = as_number(chosen.get("test_accuracy")), as_number(chosen.get("test_accuracy_se"))
    if acc is not None:
        out.append(f"- test accuracy (the test split, never used to choose): **{acc:.2f}"
                   + (f" ± {se:.2f}" if se is not None else "") + "%**")
    deployed = as_number(chosen.get("latency_ms_deployed"))
    if deployed is not None:
        p25, p75, p90 = (as_number(chosen.get(f"latency_deployed_{q}_ms")) for q in ("p25", "p75", "p90"))
        spread = "" if p25 is None or p75 is None else f" (p25-p75 {p25:.3f}-{p75:.3f} ms" + (
            f", p90 {p90:.3f} ms)" if p90 is not None else ")")
        gate = as_number(chosen.get("latency_ms"))
        out.append(f"- latency of the shipped artifact, re-timed in a fresh process: **{deployed:.3f} ms**{spread}"
                   + (f"; its gate timing before the fine-tune: {gate:.3f} ms" if gate is not None else ""))
    elif as_number(chosen.get("latency_ms")) is not None:
        out.append("- latency: the gate timing (before the fine-tune); the shipped artifact was not re-timed")
    uncounted = chosen.get(TrialAttr.UNCOUNTED_OPS)
    if not is_missing(uncounted) and str(uncounted):
        out.append(f"- MACs at least {fmt_value('mmacs', chosen.get('mmacs'))}: operators fvcore does not "
                   f"count ({uncounted})")
    return out + ([""] if out else [])


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
    lb, lc = as_number(baseline.get("latency_ms")), as_number(chosen.get("latency_ms"))
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
        figures = [fmt_value(c, row.get(c)) for c in ("accuracy", "latency_ms", "size_mb")
                   if c in row.index and not is_missing(row.get(c))]
        parts.append(f"trial #{fmt_plain(row.get('number'))} ({', '.join(figures)})")
    first = fmt_plain(ties.iloc[0].get("number"))
    return (f"Within one standard error (±{float(chosen['accuracy_se']):.2f} points) of its accuracy and "
            f"cheaper to run: {'; '.join(parts)}. Differences this small are noise of the validation set; "
            f"`autoshrink export {run} --trial {first} -o OUT` exports it.")


def _chosen_section(chosen: pd.Series, teacher: Mapping[str, Any], metrics: list[str]) -> list[str]:
    number = chosen.get("number")
    tag = f"trial #{fmt_plain(number)}" if not is_missing(number) else "chosen trial"
    out = [f"## Chosen model: {tag}", ""]
    rows, summary = [], []
    for row in compare_with_teacher(chosen, teacher, metrics):
        col = row.column
        change = ""
        if row.drop is not None:
            change = row.accuracy_change
            summary.append(f"accuracy drop {row.drop:.2f} points")
        elif row.ratio is not None:
            ratio = row.ratio
            change = ratio_text(ratio, col)
            if col == "latency_ms":
                summary.insert(0, f"**{ratio:.2f}× speed-up**" if ratio >= 1
                               else f"**{1 / ratio:.2f}× slower** than the teacher")
            elif col == "size_mb":
                summary.insert(min(1, len(summary)), f"**{ratio_text(ratio, col)}** on disk")
        value = fmt_value(col, row.chosen)
        if col == "accuracy" and not is_missing(chosen.get("accuracy_se")):
            value = f"{float(chosen['accuracy']):.2f} ± {float(chosen['accuracy_se']):.2f}%"
        rows.append([UNITS[col][0], fmt_value(col, row.teacher), value, change])
    if summary:
        out += [", ".join(summary) + ".", ""]
    out += [_md_table(["", "teacher", "chosen", "change"], rows, [False, True, True, False]), ""]
    params = [c for c in chosen.index if str(c).startswith(PARAM_PREFIX)]
    if params:
        out += ["### Configuration", ""]
        out.append(_md_table(["setting", "value"],
                             [[c[len(PARAM_PREFIX):], fmt_plain(chosen.get(c))] for c in params],
                             [False, True]))
        out.append("")
    return out


def left_alone_section(left_alone: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines naming what compression skipped: each group left unpruned with its layers and
    the reason, each layer left fp32 though int8 was asked, and why (nothing when nothing was).

    Example:
        >>> print("\\n".join(left_alone_section({"unpruned_groups": [{"layers": ["a", "b"],
        ...     "reason": "left unpruned: the group crosses a channel shuffle"}], "fp32_layers": {}})))
        ### Left uncompressed
        <BLANKLINE>
        | what | layers | why |
        | --- | --- | --- |
        | unpruned group | a, b | left unpruned: the group crosses a channel shuffle |
        <BLANKLINE>
    """
    if not left_alone:
        return []
    rows = [["unpruned group", ", ".join(g.get("layers", [])), g.get("reason", "")]
            for g in left_alone.get(TrialAttr.UNPRUNED_GROUPS) or []]
    grouped = {n for g in left_alone.get(TrialAttr.UNPRUNED_GROUPS) or [] for n in g.get("layers", [])}
    rows += [["unpruned layer", n, why] for n, why in (left_alone.get(TrialAttr.SKIPPED_LAYERS) or {}).items()
             if n not in grouped]
    rows += [["fp32 layer", n, why] for n, why in (left_alone.get(TrialAttr.FP32_LAYERS) or {}).items()]
    if not rows:
        return []
    return ["### Left uncompressed", "", _md_table(["what", "layers", "why"], rows, [False, False, False]), ""]


def _nothing_meets_section(limits: Mapping[str, float], nearest: pd.DataFrame | None) -> list[str]:
    if not limits:
        return ["## No model chosen", "",
                "No budget was set, and no trial completed with a measured accuracy.", ""]
    budget = ", ".join(f"`{c}` ≤ {fmt_value(c, v)}" for c, v in limits.items())
    out = ["## No trial meets the budget", "",
           f"No completed trial met {budget}, so no model was chosen.", ""]
    if nearest is None or nearest.empty:
        out += ["No trial measured the constrained metrics, so there is nothing to compare.", ""]
        return out
    out += ["The trials closest to it, and what each would have to change:", ""]
    cols = [c for c in ("accuracy", *limits) if c in nearest.columns]
    rows = []
    for miss in near_misses(nearest, limits):
        number = miss.number
        rows.append([f"#{fmt_plain(number)}" if not is_missing(number) else "—"]
                    + [fmt_value(c, miss.row.get(c)) for c in cols]
                    + [miss.needs])
    out.append(_md_table(["trial", *cols, "what would have to change"], rows,
                         [True] * (len(cols) + 1) + [False]))
    first = nearest.iloc[0]
    relaxed = [f"`{c}` ≤ {fmt_value(c, as_number(first.get(c)))}" for c, lim in limits.items()
               if as_number(first.get(c)) is not None and as_number(first.get(c)) > lim]
    out.append("")
    if relaxed:
        out.append(
            f"To accept trial #{fmt_plain(first.get('number'))}, relax the budget to "
            f"{', '.join(relaxed)}; or widen the search space (fewer bits, more pruning) "
            "and search again."
        )
        out.append("")
    return out


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

"""Pure functions on trial DataFrames: Pareto front, hypervolume, selection under a budget.

Everything here works on a plain :class:`pandas.DataFrame` with one row per trial (the columns of
``trials.csv``), so it applies to any finished or interrupted run without Ray, Optuna or a model.

The numeric core works on "losses to minimise" (maximised objectives are negated), as in Optuna's
``optuna/study/_multi_objective.py``: one small numpy function decides which rows are
non-dominated, and the DataFrame functions only validate, convert and select.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from autoshrink.record import Direction, State

__all__ = [
    "Direction",
    "feasible",
    "hypervolume",
    "near_ties",
    "nearest_feasible",
    "pareto_front",
    "select_best",
]

#: Value of the ``state`` column for a finished trial; only these count as results.
_COMPLETE = State.COMPLETE.value
#: States whose metrics, if any, are not trusted for "how close did it come" questions.
_FAILED = State.FAIL.value


# --------------------------------------------------------------------------------------------
# numpy core: rows are points, columns are losses to minimise
# --------------------------------------------------------------------------------------------


def _is_pareto_front(losses: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``losses`` (minimisation; duplicates all kept).

    A row is dominated when another row is <= in every column and < in at least one.
    """
    n = losses.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool)
    # + 0.0 folds -0.0 into 0.0 so that negated zeros deduplicate with real zeros.
    unique, inverse = np.unique(losses + 0.0, axis=0, return_inverse=True)
    if unique.shape[1] == 1:
        on_front = unique[:, 0] == unique[0, 0]
    elif unique.shape[1] == 2:
        on_front = _is_pareto_front_2d(unique)
    else:
        on_front = _is_pareto_front_nd(unique)
    # Identical rows share one verdict: a duplicate never dominates its twin.
    return on_front[inverse.reshape(-1)]


def _is_pareto_front_2d(unique_lexsorted: np.ndarray) -> np.ndarray:
    # Sorted by the first loss (then the second): a point is on the front iff its second loss is
    # strictly lower than that of every point before it.
    second = unique_lexsorted[:, 1]
    on_front = np.ones(len(second), dtype=bool)
    on_front[1:] = second[1:] < np.minimum.accumulate(second)[:-1]
    return on_front


def _is_pareto_front_nd(unique_lexsorted: np.ndarray) -> np.ndarray:
    # The first remaining point of a lexsorted unique set is never dominated (nothing before it is
    # <= everywhere); drop every point it dominates, i.e. every point not strictly better somewhere.
    losses = unique_lexsorted
    indices = np.arange(len(losses))
    on_front = np.zeros(len(losses), dtype=bool)
    while len(losses):
        on_front[indices[0]] = True
        keep = np.any(losses < losses[0], axis=1)
        losses, indices = losses[keep], indices[keep]
    return on_front


def _hypervolume(losses: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by ``losses`` and bounded by ``reference`` (all points strictly inside)."""
    n, dims = losses.shape
    if n == 0:
        return 0.0
    if dims == 1:
        return float(reference[0] - losses[:, 0].min())
    if dims == 2:
        return _hypervolume_2d(losses, reference)
    # Slicing (HSO): sweep the last loss upward; each slab between consecutive values is covered
    # by the (d-1)-dimensional hypervolume of the points already passed.
    losses = losses[_is_pareto_front(losses)]
    losses = losses[np.argsort(losses[:, -1], kind="stable")]
    upper = np.append(losses[1:, -1], reference[-1])
    total = 0.0
    for i in range(len(losses)):
        depth = upper[i] - losses[i, -1]
        if depth > 0:
            total += depth * _hypervolume(losses[: i + 1, :-1], reference[:-1])
    return float(total)


def _hypervolume_2d(losses: np.ndarray, reference: np.ndarray) -> float:
    order = np.lexsort((losses[:, 1], losses[:, 0]))
    x, y = losses[order, 0], losses[order, 1]
    # Between x[i] and x[i+1] the covered height is set by the lowest second loss seen so far;
    # dominated points and duplicates contribute nothing extra.
    width = np.append(x[1:], reference[0]) - x
    height = reference[1] - np.minimum.accumulate(y)
    return float(np.sum(width * height))


# --------------------------------------------------------------------------------------------
# DataFrame helpers
# --------------------------------------------------------------------------------------------


def _check_columns(df: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what} {missing[0]!r} is not a column of the trials DataFrame; "
            f"available columns: {sorted(map(str, df.columns))}"
        )


def _parse_objectives(
    df: pd.DataFrame, objectives: Mapping[str, str | Direction]
) -> dict[str, Direction]:
    if not isinstance(objectives, Mapping) or not objectives:
        raise ValueError(
            "objectives must be a non-empty mapping of column -> 'max' or 'min', "
            f"e.g. {{'accuracy': 'max', 'latency_ms': 'min'}}, but got {objectives!r}"
        )
    parsed = {str(col): Direction.parse(d, column=str(col)) for col, d in objectives.items()}
    _check_columns(df, list(parsed), "objective")
    return parsed


def _complete(df: pd.DataFrame) -> pd.Series:
    # Without a state column (a hand-made table) every row counts as a finished trial.
    if "state" not in df.columns:
        return pd.Series(True, index=df.index)
    return df["state"].astype(str).str.upper() == _COMPLETE


def _losses(df: pd.DataFrame, objectives: dict[str, Direction]) -> np.ndarray:
    values = df[list(objectives)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    signs = np.array([-1.0 if d is Direction.MAX else 1.0 for d in objectives.values()])
    return values * signs


def _parse_constraints(df: pd.DataFrame, constraints: Mapping[str, float | None] | None) -> dict:
    if constraints is None:
        return {}
    if not isinstance(constraints, Mapping):
        raise TypeError(
            "constraints must be a mapping of column -> upper limit, e.g. {'latency_ms': 5.0}, "
            f"but got {type(constraints).__name__}"
        )
    # A None limit means "no limit on this column" (a Budget turned into a dict keeps its Nones).
    limits = {str(c): v for c, v in constraints.items() if v is not None}
    for col, limit in limits.items():
        if isinstance(limit, bool) or not isinstance(limit, (int, float, np.number)) or not (
            math.isfinite(float(limit))
        ):
            raise ValueError(f"constraint {col!r} must be a finite number, but got {limit!r}")
    _check_columns(df, list(limits), "constraint")
    return {c: float(v) for c, v in limits.items()}


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def pareto_front(df: pd.DataFrame, objectives: Mapping[str, str | Direction]) -> pd.DataFrame:
    """The non-dominated rows of ``df`` for the given objectives.

    A row is dominated when another row is at least as good in every objective and strictly better
    in one; exact duplicates therefore are all kept. Rows with NaN in any objective are left out,
    and so are rows whose ``state`` is not ``"COMPLETE"`` when the column exists (a pruned trial's
    intermediate accuracy is not a result).

    Args:
        df: trials, one row per trial.
        objectives: column -> ``"max"`` / ``"min"`` (or :class:`Direction`), at least one.

    Returns:
        The front rows (original index and columns), best first by the first objective, ties
        broken best first by the next objectives, then by ``number`` when present.

    Raises:
        ValueError: an objective is not a column, or a direction is not ``"max"``/``"min"``.

    Example:
        >>> df = pd.DataFrame({"accuracy": [90, 95, 80], "latency_ms": [2.0, 4.0, 3.0]})
        >>> pareto_front(df, {"accuracy": "max", "latency_ms": "min"}).index.tolist()
        [1, 0]
    """
    parsed = _parse_objectives(df, objectives)
    losses = _losses(df, parsed)
    usable = ~np.isnan(losses).any(axis=1) & _complete(df).to_numpy()
    rows = df[usable]
    front = rows[_is_pareto_front(losses[usable])]
    return _sort_best_first(front, _losses(front, parsed))


def _sort_best_first(df: pd.DataFrame, losses: np.ndarray) -> pd.DataFrame:
    keys = [losses[:, j] for j in range(losses.shape[1])]
    if "number" in df.columns:
        keys.append(pd.to_numeric(df["number"], errors="coerce").to_numpy(dtype=float))
    # np.lexsort sorts by the last key first.
    return df.iloc[np.lexsort(keys[::-1])] if len(df) else df


def hypervolume(
    df: pd.DataFrame,
    objectives: Mapping[str, str | Direction],
    reference: Mapping[str, float],
) -> float:
    """Hypervolume dominated by the rows of ``df`` and bounded by a reference point.

    Rows are filtered as in :func:`pareto_front`. A row that is not strictly better than the
    reference in every objective adds nothing. Exact: a sweep for two objectives, slicing for more
    (fine up to a few hundred points).

    Args:
        df: trials, one row per trial.
        objectives: column -> ``"max"`` / ``"min"``.
        reference: column -> value of the reference (worst acceptable) point, one per objective.

    Returns:
        The hypervolume in the product of the objectives' units (0.0 when no row counts).

    Raises:
        ValueError: as :func:`pareto_front`, or a reference value is missing or not finite.

    Example:
        >>> df = pd.DataFrame({"accuracy": [90.0, 95.0], "latency_ms": [2.0, 4.0]})
        >>> hypervolume(df, {"accuracy": "max", "latency_ms": "min"},
        ...             reference={"accuracy": 80.0, "latency_ms": 5.0})
        35.0
    """
    parsed = _parse_objectives(df, objectives)
    if not isinstance(reference, Mapping):
        raise ValueError(f"reference must be a mapping of objective -> value, got {reference!r}")
    missing = [c for c in parsed if c not in reference]
    if missing:
        raise ValueError(
            f"reference has no value for objective {missing[0]!r}; give one for each of "
            f"{list(parsed)}, e.g. reference={{{', '.join(f'{c!r}: ...' for c in parsed)}}}"
        )
    ref = []
    for col, direction in parsed.items():
        value = reference[col]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
            math.isfinite(float(value))
        ):
            raise ValueError(f"reference[{col!r}] must be a finite number, but got {value!r}")
        ref.append(-float(value) if direction is Direction.MAX else float(value))
    ref_losses = np.array(ref)
    losses = _losses(df, parsed)
    usable = ~np.isnan(losses).any(axis=1) & _complete(df).to_numpy()
    losses = losses[usable]
    losses = losses[np.all(losses < ref_losses, axis=1)]
    return _hypervolume(losses, ref_losses)


def feasible(df: pd.DataFrame, constraints: Mapping[str, float | None] | None) -> pd.Series:
    """Which rows are COMPLETE trials whose constrained columns are all within the limits.

    Args:
        df: trials, one row per trial.
        constraints: column -> upper limit (``value <= limit`` holds); a ``None`` limit is ignored.
            An empty or ``None`` mapping makes every COMPLETE row feasible.

    Returns:
        A boolean Series aligned with ``df.index``; NaN values count as not feasible.

    Raises:
        ValueError: a constrained column is missing or a limit is not a finite number.
        TypeError: ``constraints`` is not a mapping.

    Example:
        >>> df = pd.DataFrame({"state": ["COMPLETE", "COMPLETE", "FAIL"],
        ...                    "latency_ms": [4.0, 6.0, 1.0]})
        >>> feasible(df, {"latency_ms": 5.0}).tolist()
        [True, False, False]
    """
    limits = _parse_constraints(df, constraints)
    ok = _complete(df).copy()
    for col, limit in limits.items():
        values = pd.to_numeric(df[col], errors="coerce")
        ok &= (values <= limit).fillna(False).astype(bool)
    return ok.rename("feasible")


def select_best(
    df: pd.DataFrame,
    constraints: Mapping[str, float | None] | None,
    objective: str = "accuracy",
    max_drop: float | None = None,
    reference_accuracy: float | None = None,
    *,
    latency: str = "latency_ms",
) -> pd.Series | None:
    """The trial to ship: the best feasible COMPLETE row with a measured ``objective``.

    By default the row with the highest ``objective``; ties go to lower ``latency_ms``, then lower
    ``size_mb``, then lower ``number`` (columns that are absent are skipped). With ``max_drop``, the
    fastest row (lowest ``latency_ms``) whose ``objective`` is at least
    ``reference_accuracy - max_drop``; ties go to higher ``objective``, then as above.

    Args:
        df: trials, one row per trial.
        constraints: column -> upper limit, as in :func:`feasible`.
        objective: the column maximised (or floored by ``max_drop``).
        max_drop: largest allowed loss of ``objective`` in points versus ``reference_accuracy``.
        reference_accuracy: the uncompressed model's ``objective``; required with ``max_drop``.
        latency: the latency column that breaks ties and that ``max_drop`` minimises (e.g. the
            re-measured figure, see :mod:`autoshrink.finalists`).

    Returns:
        The chosen row (its index label is the Series name), or ``None`` if no row qualifies.

    Raises:
        ValueError: unknown columns, ``max_drop`` negative or without ``reference_accuracy``.

    Example:
        >>> df = pd.DataFrame({"number": [0, 1, 2], "state": ["COMPLETE"] * 3,
        ...                    "accuracy": [97.0, 96.5, 99.0], "latency_ms": [3.0, 2.0, 9.0]})
        >>> int(select_best(df, {"latency_ms": 5.0})["number"])
        0
        >>> row = select_best(df, {"latency_ms": 5.0}, max_drop=3.0, reference_accuracy=99.0)
        >>> int(row["number"])
        1
    """
    _check_columns(df, [objective], "objective")
    if max_drop is not None:
        if reference_accuracy is None:
            raise ValueError(
                "max_drop needs reference_accuracy (the uncompressed model's accuracy), "
                f"but got max_drop={max_drop!r}, reference_accuracy=None"
            )
        if not math.isfinite(float(max_drop)) or max_drop < 0:
            raise ValueError(f"`max_drop >= 0` must hold, but got max_drop={max_drop!r}")
        if latency not in df.columns:
            raise ValueError(
                f"max_drop mode picks the lowest {latency}, but the DataFrame has no {latency!r} "
                f"column; available columns: {sorted(map(str, df.columns))}"
            )
    score = pd.to_numeric(df[objective], errors="coerce")
    ok = feasible(df, constraints) & score.notna()
    if max_drop is not None:
        ok &= score >= float(reference_accuracy) - float(max_drop)
    rows = df[ok]
    if rows.empty:
        return None

    def key(col: str, sign: float) -> np.ndarray:
        if col not in rows.columns:
            return np.zeros(len(rows))
        values = pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float) * sign
        # Unmeasured tie-breakers lose the tie.
        return np.where(np.isnan(values), np.inf, values)

    if max_drop is None:
        keys = [key(objective, -1.0), key(latency, 1.0)]
    else:
        keys = [key(latency, 1.0), key(objective, -1.0)]
    keys += [key("size_mb", 1.0), key("number", 1.0)]
    best = np.lexsort(keys[::-1])[0]
    return rows.iloc[best]


def near_ties(
    df: pd.DataFrame,
    constraints: Mapping[str, float | None] | None,
    chosen: pd.Series,
    objective: str = "accuracy",
    k: int = 3,
    *,
    latency: str = "latency_ms",
) -> pd.DataFrame:
    """Feasible rows as good as ``chosen`` within its standard error, and cheaper to run.

    The chosen row is the most accurate, but a difference smaller than the accuracy's standard
    error (column ``{objective}_se``) is noise of the validation set. A row is listed when it is
    feasible, its ``objective`` is at least ``chosen - se``, and it is no slower and no larger than
    ``chosen`` (``latency_ms``, ``size_mb``; absent columns are skipped) and strictly smaller in
    one of them. Among such rows only the non-dominated ones (objective up, latency down) are kept.

    Args:
        df: trials, one row per trial.
        constraints: column -> upper limit, as in :func:`feasible`.
        chosen: the selected row (from :func:`select_best`).
        objective: the maximised column.
        k: how many rows to return at most.
        latency: the latency column compared (as in :func:`select_best`).

    Returns:
        Up to ``k`` rows, fastest first; no rows when ``chosen`` has no standard error.

    Example:
        >>> df = pd.DataFrame({"number": [0, 1, 2], "accuracy": [95.4, 95.2, 94.0],
        ...                    "accuracy_se": [0.3] * 3, "latency_ms": [2.2, 1.6, 1.0]})
        >>> chosen = select_best(df, {"latency_ms": 5.0})
        >>> near_ties(df, {"latency_ms": 5.0}, chosen)["number"].tolist()
        [1]
    """
    _check_columns(df, [objective], "objective")
    se = pd.to_numeric(pd.Series([chosen.get(f"{objective}_se")]), errors="coerce").iloc[0]
    best = pd.to_numeric(pd.Series([chosen.get(objective)]), errors="coerce").iloc[0]
    if not (np.isfinite(se) and np.isfinite(best)) or se <= 0:
        return df.iloc[:0]
    score = pd.to_numeric(df[objective], errors="coerce")
    ok = feasible(df, constraints) & (score >= best - se)
    cheaper = pd.Series(False, index=df.index)
    for col in (latency, "size_mb"):
        if col not in df.columns:
            continue
        ref = pd.to_numeric(pd.Series([chosen.get(col)]), errors="coerce").iloc[0]
        if not np.isfinite(ref):
            continue
        values = pd.to_numeric(df[col], errors="coerce")
        ok &= (values <= ref).fillna(False).astype(bool)
        cheaper |= (values < ref).fillna(False).astype(bool)
    rows = df[ok & cheaper]
    if rows.empty:
        return rows
    axes = ({objective: Direction.MAX, latency: Direction.MIN} if latency in rows.columns
            else {objective: Direction.MAX})
    front = pareto_front(rows, axes)
    order = latency if latency in front.columns else objective
    return front.sort_values(order, ascending=order != objective, kind="stable").head(k)


def nearest_feasible(
    df: pd.DataFrame, constraints: Mapping[str, float | None], k: int = 3
) -> pd.DataFrame:
    """The rows closest to meeting the budget, to tell the user what would have to change.

    The violation of a row is ``max over constraints of (value / limit - 1)``: 0.25 means the worst
    constrained column is 25 % over its limit (a row within every limit has a violation <= 0).
    Rows with a constrained column unmeasured and ``FAIL`` rows are left out; other states are kept,
    since a candidate that missed the budget is recorded without being fine-tuned.

    Args:
        df: trials, one row per trial.
        constraints: column -> upper limit (> 0); a ``None`` limit is ignored.
        k: how many rows to return at most (>= 1).

    Returns:
        Up to ``k`` rows, smallest violation first (ties: higher ``accuracy``, then lower
        ``number``), with a ``violation`` column added; no rows when there are no constraints.

    Raises:
        ValueError: a limit that is not > 0, an unknown column, or ``k < 1``.

    Example:
        >>> df = pd.DataFrame({"number": [0, 1], "latency_ms": [6.0, 10.0]})
        >>> nearest_feasible(df, {"latency_ms": 5.0}, k=1)["violation"].round(2).tolist()
        [0.2]
    """
    limits = _parse_constraints(df, constraints)
    bad = {c: v for c, v in limits.items() if v <= 0}
    if bad:
        col, value = next(iter(bad.items()))
        raise ValueError(
            f"constraint {col!r} must be > 0 to measure a relative violation, but got {value!r}"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"`k >= 1` must hold, but got k={k!r}")
    if not limits:
        # Without a budget nothing is over it, and no row is nearer to it than another.
        return df.iloc[:0].assign(violation=pd.Series(dtype=float))
    ratios = pd.DataFrame(
        {c: pd.to_numeric(df[c], errors="coerce") / lim - 1.0 for c, lim in limits.items()},
        index=df.index,
    )
    violation = ratios.max(axis=1, skipna=False)
    keep = violation.notna()
    if "state" in df.columns:
        keep &= df["state"].astype(str).str.upper() != _FAILED
    out = df[keep].assign(violation=violation[keep].astype(float))
    if out.empty:
        return out
    keys = [out["violation"].to_numpy(dtype=float)]
    for col, sign in (("accuracy", -1.0), ("number", 1.0)):
        if col in out.columns:
            values = pd.to_numeric(out[col], errors="coerce").to_numpy(dtype=float) * sign
            keys.append(np.where(np.isnan(values), np.inf, values))
    return out.iloc[np.lexsort(keys[::-1])[:k]]

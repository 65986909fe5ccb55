"""Choosing with the deployed figure: pure functions on trial DataFrames, next to :mod:`frontier`.

Each trial's gate latency (``latency_ms``) is cheap and taken before the fine-tune, on another
graph than the one that ships. After the trials, the finalists are re-timed from their saved
artifacts (:func:`autoshrink.measure.remeasure.remeasure`), which fills ``latency_ms_deployed``
(+ ``latency_deployed_p25_ms`` / ``_p75_ms`` / ``_p90_ms`` and the median's bootstrap interval
``latency_deployed_ci_low_ms`` / ``_ci_high_ms``) for those rows. From then on:

- the **effective** latency (``latency_ms_effective``) is the deployed figure where there is one
  and the gate figure otherwise, and ``latency_source`` says which (``"deployed"`` / ``"gate"``);
- ``meets_budget`` of a re-measured row is recomputed from it (the gate's verdict is kept as
  ``meets_budget_gate``); the front, the hypervolume and the choice all use it;
- :func:`rechoose` re-times until the chosen row's figure is a deployed one: when the chosen
  model's re-timing misses the budget, the next best is re-timed before it is chosen.

Nothing here imports torch or Optuna: the re-timing itself comes in as a function.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from autoshrink.frontier import feasible, hypervolume, near_ties, pareto_front, select_best

__all__ = [
    "DEPLOYED",
    "EFFECTIVE",
    "OBJECTIVES_EFFECTIVE",
    "SOURCE",
    "TEST_COLUMNS",
    "LatencySource",
    "Rechosen",
    "choose",
    "effective_constraints",
    "effective_front",
    "effective_hypervolume",
    "effective_near_ties",
    "merge_deployed",
    "merge_test_scores",
    "noise_interval",
    "noise_note",
    "rechoose",
    "score_test_split",
    "to_retime",
    "with_effective_latency",
    "within_noise",
]

GATE = "latency_ms"
#: the re-measured median of the shipped artifact
DEPLOYED = "latency_ms_deployed"
DEPLOYED_SPREAD = (
    "latency_deployed_p25_ms", "latency_deployed_p75_ms", "latency_deployed_p90_ms",
    "latency_deployed_ci_low_ms", "latency_deployed_ci_high_ms",
)
#: deployed where re-measured, gate otherwise: the figure that decides
EFFECTIVE = "latency_ms_effective"
#: which figure ``latency_ms_effective`` is
SOURCE = "latency_source"
OBJECTIVES_EFFECTIVE = {"accuracy": "max", EFFECTIVE: "min"}
#: the test split's score, for the front and the chosen model only (never used to choose)
TEST_COLUMNS = ("test_accuracy", "test_accuracy_se")


class LatencySource(str, enum.Enum):
    """Where a row's deciding latency comes from."""

    DEPLOYED = "deployed"  # the shipped artifact, re-timed in a fresh process
    GATE = "gate"  # the trial's own timing, before the fine-tune


def _numeric(df: pd.DataFrame, col: str) -> pd.Series:
    if col not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[col], errors="coerce")


def effective_constraints(constraints: Mapping[str, float | None] | None) -> dict[str, float | None]:
    """The budget's limits with the latency limit on :data:`EFFECTIVE` instead of ``latency_ms``.

    Example:
        >>> effective_constraints({"latency_ms": 5.0, "size_mb": None})
        {'latency_ms_effective': 5.0, 'size_mb': None}
    """
    return {(EFFECTIVE if k == GATE else k): v for k, v in (constraints or {}).items()}


def with_effective_latency(
    df: pd.DataFrame, constraints: Mapping[str, float | None] | None = None
) -> pd.DataFrame:
    """A copy of ``df`` with the effective latency, its source, and ``meets_budget`` from it.

    Args:
        df: trials, one row per trial (``latency_ms``; ``latency_ms_deployed`` where re-measured).
        constraints: the budget's limits (``Budget.constraints()``); re-measured rows get
            ``meets_budget`` recomputed under them, the others keep theirs.

    Returns:
        ``df`` plus ``latency_ms_effective``, ``latency_source`` and ``meets_budget_gate`` (the
        trial's own verdict); ``meets_budget`` is the verdict on the effective figures.

    Example:
        >>> df = pd.DataFrame({"number": [0, 1], "state": ["COMPLETE"] * 2, "accuracy": [95.0, 94.0],
        ...                    "latency_ms": [4.8, 4.0], "meets_budget": [True, True],
        ...                    "latency_ms_deployed": [5.3, None]})
        >>> out = with_effective_latency(df, {"latency_ms": 5.0})
        >>> out[["latency_ms_effective", "latency_source", "meets_budget"]].values.tolist()
        [[5.3, 'deployed', False], [4.0, 'gate', True]]
    """
    out = df.copy()
    gate, deployed = _numeric(out, GATE), _numeric(out, DEPLOYED)
    retimed = deployed.notna()
    out[EFFECTIVE] = deployed.where(retimed, gate)
    out[SOURCE] = np.where(retimed, LatencySource.DEPLOYED.value, LatencySource.GATE.value)
    gate_verdict = out["meets_budget"] if "meets_budget" in out.columns else pd.Series(None, index=out.index)
    out["meets_budget_gate"] = gate_verdict
    if retimed.any():
        ok = feasible(out, effective_constraints(constraints))
        verdict = gate_verdict.astype(object).copy()
        verdict[retimed] = ok[retimed].astype(bool)
        out["meets_budget"] = verdict
    return out


def _view(df: pd.DataFrame, constraints: Mapping[str, float | None] | None) -> pd.DataFrame:
    return df if EFFECTIVE in df.columns and SOURCE in df.columns else with_effective_latency(df, constraints)


def effective_front(df: pd.DataFrame, constraints: Mapping[str, float | None] | None = None) -> pd.DataFrame:
    """The Pareto front on accuracy and the effective latency (see :func:`autoshrink.frontier.pareto_front`).

    Example:
        >>> df = pd.DataFrame({"accuracy": [95.0, 94.0], "latency_ms": [2.0, 3.0],
        ...                    "latency_ms_deployed": [3.5, None]})
        >>> effective_front(df)["latency_source"].tolist()
        ['deployed', 'gate']
    """
    return pareto_front(_view(df, constraints), OBJECTIVES_EFFECTIVE)


def effective_hypervolume(
    df: pd.DataFrame, reference: Mapping[str, float], constraints: Mapping[str, float | None] | None = None
) -> float:
    """Hypervolume on accuracy and the effective latency; ``reference`` may name ``latency_ms``.

    Example:
        >>> df = pd.DataFrame({"accuracy": [90.0], "latency_ms": [2.0], "latency_ms_deployed": [3.0]})
        >>> effective_hypervolume(df, {"accuracy": 80.0, "latency_ms": 5.0})
        20.0
    """
    ref = {(EFFECTIVE if k == GATE else k): v for k, v in reference.items()}
    return hypervolume(_view(df, constraints), OBJECTIVES_EFFECTIVE, ref)


def choose(
    df: pd.DataFrame,
    constraints: Mapping[str, float | None] | None,
    *,
    max_drop: float | None = None,
    reference_accuracy: float | None = None,
) -> pd.Series | None:
    """The row to ship, judged on the effective latency (:func:`autoshrink.frontier.select_best`).

    Example:
        >>> df = pd.DataFrame({"number": [0, 1], "state": ["COMPLETE"] * 2, "accuracy": [95.0, 94.0],
        ...                    "latency_ms": [4.8, 4.0], "latency_ms_deployed": [5.3, None]})
        >>> int(choose(df, {"latency_ms": 5.0})["number"])
        1
    """
    view = _view(df, constraints)
    return select_best(view, effective_constraints(constraints), max_drop=max_drop,
                       reference_accuracy=reference_accuracy, latency=EFFECTIVE)


def effective_near_ties(
    df: pd.DataFrame, constraints: Mapping[str, float | None] | None, chosen: pd.Series, k: int = 3
) -> pd.DataFrame:
    """:func:`autoshrink.frontier.near_ties` on the effective latency."""
    return near_ties(_view(df, constraints), effective_constraints(constraints), chosen, k=k, latency=EFFECTIVE)


def to_retime(
    df: pd.DataFrame,
    constraints: Mapping[str, float | None] | None,
    *,
    max_drop: float | None = None,
    reference_accuracy: float | None = None,
    exclude: Iterable[int] = (),
) -> list[int]:
    """Trial numbers to re-time: the front of the feasible rows, and the chosen row.

    The front is taken among the rows within the budget (a more accurate row over the budget
    does not hide one under it), on the effective latency. Rows already re-measured, and the
    numbers in ``exclude`` (e.g. whose artifact is missing), are left out.

    Returns:
        Trial numbers, ascending.

    Example:
        >>> df = pd.DataFrame({"number": [0, 1, 2], "state": ["COMPLETE"] * 3,
        ...                    "accuracy": [95.0, 94.0, 96.0], "latency_ms": [4.8, 4.0, 7.0]})
        >>> to_retime(df, {"latency_ms": 5.0})
        [0, 1]
    """
    view = _view(df, constraints)
    limits = effective_constraints(constraints)
    ok = feasible(view, limits)
    front = pareto_front(view[ok], OBJECTIVES_EFFECTIVE)
    wanted = set(front["number"].astype(int))
    chosen = select_best(view, limits, max_drop=max_drop, reference_accuracy=reference_accuracy, latency=EFFECTIVE)
    if chosen is not None:
        wanted.add(int(chosen["number"]))
    done = set(view.loc[view[SOURCE] == LatencySource.DEPLOYED.value, "number"].astype(int))
    return sorted(wanted - done - set(exclude))


def merge_test_scores(df: pd.DataFrame, scores: Mapping[int, Mapping[str, float | None]]) -> pd.DataFrame:
    """A copy of ``df`` with test-split scores (``test_accuracy``, ``test_accuracy_se``) for the
    trials scored on it (the front and the chosen one); the others stay NaN.

    Example:
        >>> df = pd.DataFrame({"number": [0, 1], "accuracy": [95.0, 94.0]})
        >>> merge_test_scores(df, {"1": {"test_accuracy": 93.5}})["test_accuracy"].tolist()
        [nan, 93.5]
    """
    return _merge(df, scores, TEST_COLUMNS, "test-split")


def merge_deployed(df: pd.DataFrame, figures: Mapping[int, Mapping[str, float]]) -> pd.DataFrame:
    """A copy of ``df`` with re-measured figures written into the rows of their trial numbers.

    Args:
        df: trials with a ``number`` column.
        figures: trial number -> ``{column: value}`` (``Spread.columns()``: ``latency_ms_deployed``
            and the ``latency_deployed_*`` columns).

    Raises:
        ValueError: a number that is not in ``df``, or a column that is not a deployed figure.

    Example:
        >>> df = pd.DataFrame({"number": [0, 1], "latency_ms": [4.8, 4.0]})
        >>> merge_deployed(df, {0: {"latency_ms_deployed": 5.3}})["latency_ms_deployed"].tolist()
        [5.3, nan]
    """
    out = _merge(df, figures, (DEPLOYED, *DEPLOYED_SPREAD), "deployed-latency")
    # the effective view is derived from these: drop a stale one
    return out.drop(columns=[c for c in (EFFECTIVE, SOURCE) if c in out.columns])


def _merge(df: pd.DataFrame, figures: Mapping, allowed: tuple[str, ...], what: str) -> pd.DataFrame:
    out = df.copy()
    for col in allowed:
        if col not in out.columns:
            out[col] = np.nan
    numbers = pd.to_numeric(out["number"], errors="coerce")
    for number, cols in figures.items():  # keys may be strings (a JSON study attribute)
        rows = numbers == int(number)
        if not rows.any():
            known = sorted(numbers.dropna().astype(int))
            raise ValueError(f"{what} figures for trial {number}, which is not in the trials (numbers {known})")
        for col, value in cols.items():
            if col not in allowed:
                raise ValueError(f"{col!r} is not a {what} column; expected one of {list(allowed)}")
            out.loc[rows, col] = np.nan if value is None else float(value)
    return out


@dataclass
class Rechosen:
    """The outcome of :func:`rechoose`.

    Attributes:
        trials: the trials with deployed figures merged and the effective view added.
        chosen: the row to ship (None when none meets the budget).
        rounds: how many re-timing rounds ran.
        retimed: trial numbers re-timed, in order.
        notes: one line per thing a user must hear (a failed re-timing, a choice that changed,
            a chosen row left on its gate figure).
    """

    trials: pd.DataFrame
    chosen: pd.Series | None
    rounds: int = 0
    retimed: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def rechoose(
    df: pd.DataFrame,
    constraints: Mapping[str, float | None] | None,
    measure: Callable[[list[int]], Mapping[int, Mapping[str, float] | str]],
    *,
    max_drop: float | None = None,
    reference_accuracy: float | None = None,
    max_rounds: int = 3,
) -> Rechosen:
    """Re-time the finalists and choose on the deployed figure, re-timing again while the choice
    rests on a gate figure.

    Args:
        df: trials, one row per trial.
        constraints: the budget's limits.
        measure: trial numbers -> per number, ``Spread.columns()`` or an error text (e.g. its
            ``model.pt2`` is missing); one call is one fresh re-timing process.
        max_drop, reference_accuracy: as :func:`autoshrink.frontier.select_best`.
        max_rounds: at most this many calls of ``measure``.

    Returns:
        A :class:`Rechosen`.

    Example:
        >>> df = pd.DataFrame({"number": [0, 1], "state": ["COMPLETE"] * 2, "accuracy": [95.0, 94.0],
        ...                    "latency_ms": [4.8, 4.0]})
        >>> timed = {0: 5.3, 1: 4.1}
        >>> out = rechoose(df, {"latency_ms": 5.0}, lambda ns: {n: {"latency_ms_deployed": timed[n]} for n in ns})
        >>> int(out.chosen["number"]), out.notes[0][:39]
        (1, 'trial 0, chosen on its gate latency 4.8')
    """
    if max_rounds < 1:
        raise ValueError(f"`max_rounds >= 1` must hold, but got max_rounds={max_rounds!r}")
    sel = dict(max_drop=max_drop, reference_accuracy=reference_accuracy)  # noqa: C408 - keywords, not stored keys
    trials = df
    first = select_best(df, constraints, **sel)
    failed: set[int] = set()
    out = Rechosen(trials=with_effective_latency(df, constraints), chosen=None)
    while out.rounds < max_rounds:
        numbers = to_retime(trials, constraints, exclude=failed, **sel)
        if not numbers:
            break
        got = measure(numbers)
        out.rounds += 1
        figures = {}
        for n in numbers:
            value = got.get(n, "not re-timed (no result returned)")
            if isinstance(value, str):
                failed.add(n)
                out.notes.append(f"trial {n}: could not be re-timed as shipped ({value}); its gate latency stands")
            else:
                figures[n] = value
                out.retimed.append(n)
        trials = merge_deployed(trials, figures)
    out.trials = with_effective_latency(trials, constraints)
    out.chosen = choose(out.trials, constraints, **sel)
    if first is not None and (out.chosen is None or int(out.chosen["number"]) != int(first["number"])):
        row = out.trials.loc[out.trials["number"] == first["number"]].iloc[0]
        now = "nothing meets the budget" if out.chosen is None else f"trial {int(out.chosen['number'])} is chosen"
        out.notes.append(
            f"trial {int(first['number'])}, chosen on its gate latency {float(first[GATE]):.3f} ms, "
            f"re-timed as shipped at {float(row[EFFECTIVE]):.3f} ms: {now}"
        )
    if out.chosen is not None and out.chosen[SOURCE] != LatencySource.DEPLOYED.value:
        out.notes.append(
            f"trial {int(out.chosen['number'])} is chosen on its gate latency: its shipped artifact "
            f"was not re-timed (after {out.rounds} round(s))"
        )
    return out


def score_test_split(
    rechosen: Rechosen,
    score: Callable[[int], tuple[float, float | None]],
    constraints: Mapping[str, float | None] | None = None,
) -> tuple[dict[int, dict[str, float | None]], list[str]]:
    """Score the effective front and the chosen row once on the test split.

    Args:
        rechosen: the outcome of :func:`rechoose`.
        score: trial number -> ``(test_accuracy, test_accuracy_se)`` of its shipped artifact, e.g.
            ``task.evaluate(load_deployable(path), fixed_batch=True, split="test")``; an
            exception (a missing artifact) is noted, not raised.
        constraints: the budget's limits (for the effective view).

    Returns:
        ``({number: {"test_accuracy": ..., "test_accuracy_se": ...}}, notes)``; merge the first with
        :func:`merge_test_scores`.

    Example:
        >>> df = pd.DataFrame({"number": [0, 1], "state": ["COMPLETE"] * 2, "accuracy": [95.0, 94.0],
        ...                    "latency_ms": [4.8, 4.0]})
        >>> timed = {0: 4.9, 1: 4.0}
        >>> got = rechoose(df, {"latency_ms": 5.0}, lambda ns: {n: {"latency_ms_deployed": timed[n]} for n in ns})
        >>> sorted(score_test_split(got, lambda n: (90.0 + n, 0.5))[0])
        [0, 1]
    """
    numbers = set(effective_front(rechosen.trials, constraints)["number"].astype(int))
    if rechosen.chosen is not None:
        numbers.add(int(rechosen.chosen["number"]))
    out: dict[int, dict[str, float | None]] = {}
    notes: list[str] = []
    for n in sorted(numbers):
        try:
            acc, se = score(n)
        except Exception as exc:  # noqa: BLE001  (a missing artifact, a loader's error: noted per trial)
            notes.append(f"trial {n}: not scored on the test split ({type(exc).__name__}: {exc})")
            continue
        out[n] = {"test_accuracy": float(acc), "test_accuracy_se": None if se is None else float(se)}
    return out, notes


def within_noise(budget_ms: float | None, interval: tuple[float, float] | None) -> bool:
    """Whether a latency budget lies inside a model's interval of its median (inclusive).

    Then "meets the budget" (or "misses it") is a statement the timing cannot support: another
    re-timing may well come out on the other side.

    Example:
        >>> within_noise(5.0, (4.9, 5.1)), within_noise(5.0, (4.0, 4.5)), within_noise(None, (1, 2))
        (True, False, False)
    """
    if budget_ms is None or interval is None:
        return False
    lo, hi = (float(v) if v is not None else math.nan for v in interval)
    if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(float(budget_ms))):
        return False
    return min(lo, hi) <= float(budget_ms) <= max(lo, hi)


def noise_interval(chosen: pd.Series) -> tuple[tuple[float, float], str] | None:
    """The wider of the re-timed median's bootstrap interval and the calls' p25-p75, and its name.

    The bootstrap interval says how well one process pinned the median down; re-timing in another
    process drifts further than that on a shared machine (the bench showed it), so the
    interquartile range of the calls is taken when it is the wider one.

    Example:
        >>> noise_interval(pd.Series({"latency_deployed_ci_low_ms": 4.9, "latency_deployed_ci_high_ms": 5.0,
        ...                           "latency_deployed_p25_ms": 4.8, "latency_deployed_p75_ms": 5.2}))[1]
        'interquartile range (p25-p75) of its re-timed calls'
    """
    named = [
        ((chosen.get("latency_deployed_ci_low_ms"), chosen.get("latency_deployed_ci_high_ms")),
         "bootstrap interval of its re-timed median"),
        ((chosen.get("latency_deployed_p25_ms"), chosen.get("latency_deployed_p75_ms")),
         "interquartile range (p25-p75) of its re-timed calls"),
    ]
    best = None
    for (lo, hi), name in named:
        try:
            lo, hi = float(lo), float(hi)
        except (TypeError, ValueError):
            continue
        if math.isfinite(lo) and math.isfinite(hi) and (best is None or hi - lo > best[0][1] - best[0][0]):
            best = ((min(lo, hi), max(lo, hi)), name)
    return best


def noise_note(chosen: pd.Series | None, budget_ms: float | None) -> str | None:
    """One line when the budget is inside the chosen row's noise interval (:func:`noise_interval`:
    the wider of the median's bootstrap interval and the calls' p25-p75, named in the text), else None.

    Example:
        >>> row = pd.Series({"number": 3, "latency_ms_deployed": 4.97,
        ...                  "latency_deployed_ci_low_ms": 4.9, "latency_deployed_ci_high_ms": 5.05})
        >>> noise_note(row, 5.0)[:55]
        "within the noise: the budget 5 ms lies inside trial 3's"
    """
    if chosen is None or budget_ms is None:
        return None
    found = noise_interval(chosen)
    if found is None or not within_noise(budget_ms, found[0]):
        return None
    (lo, hi), name = found
    return (
        f"within the noise: the budget {budget_ms:g} ms lies inside trial {int(chosen['number'])}'s "
        f"{name} ({lo:.3f}-{hi:.3f} ms, median {float(chosen[DEPLOYED]):.3f} ms); another timing may fall "
        "on the other side of it"
    )

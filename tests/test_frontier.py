from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from autoshrink.frontier import (
    Direction,
    feasible,
    hypervolume,
    near_ties,
    nearest_feasible,
    pareto_front,
    select_best,
)

# --------------------------------------------------------------------------------------------
# brute-force references
# --------------------------------------------------------------------------------------------


def _brute_front(df: pd.DataFrame, objectives: dict[str, str]) -> set:
    """Index labels of the non-dominated complete rows, by the O(n²) definition."""
    rows = df.dropna(subset=list(objectives))
    if "state" in rows.columns:
        rows = rows[rows["state"] == "COMPLETE"]
    signs = np.array([-1.0 if d == "max" else 1.0 for d in objectives.values()])
    losses = rows[list(objectives)].to_numpy(float) * signs
    keep = set()
    for i, li in enumerate(losses):
        dominated = any(
            np.all(lj <= li) and np.any(lj < li) for j, lj in enumerate(losses) if j != i
        )
        if not dominated:
            keep.add(rows.index[i])
    return keep


def _grid_hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Hypervolume of integer points (minimisation) by counting dominated unit cells."""
    ranges = [range(int(p), int(r)) for p, r in zip(points.min(axis=0), reference, strict=True)]
    count = 0
    for cell in itertools.product(*ranges):
        if np.any(np.all(points <= np.array(cell), axis=1)):
            count += 1
    return float(count)


def _random_trials(seed: int, n: int, n_obj: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    # Few distinct values: many ties and exact duplicates.
    data = {f"o{j}": rng.integers(0, 6, n).astype(float) for j in range(n_obj)}
    df = pd.DataFrame(data)
    df.loc[rng.random(n) < 0.1, "o0"] = np.nan
    df["number"] = np.arange(n)
    df["state"] = rng.choice(["COMPLETE"] * 8 + ["FAIL", "PRUNED"], n)
    # Labels that are not positions, to catch index/position mix-ups.
    df.index = 1000 + 3 * np.arange(n)
    return df


# --------------------------------------------------------------------------------------------
# pareto_front
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(
    "objectives",
    [
        {"o0": "min", "o1": "min"},
        {"o0": "max", "o1": "min"},
        {"o0": "min", "o1": "max", "o2": "min"},
        {"o0": "max", "o1": "max", "o2": "max", "o3": "min"},
        {"o1": "max"},
    ],
)
def test_pareto_front_matches_brute_force(seed: int, objectives: dict[str, str]) -> None:
    df = _random_trials(seed, n=60, n_obj=4)
    front = pareto_front(df, objectives)
    assert set(front.index) == _brute_front(df, objectives)
    assert list(front.columns) == list(df.columns)


def test_pareto_front_keeps_exact_duplicates_and_sorts_best_first() -> None:
    df = pd.DataFrame(
        {
            "number": [0, 1, 2, 3, 4],
            "accuracy": [95.0, 95.0, 90.0, 97.0, 94.0],
            "latency_ms": [3.0, 3.0, 2.0, 5.0, 3.0],
        }
    )
    front = pareto_front(df, {"accuracy": "max", "latency_ms": Direction.MIN})
    assert front["number"].tolist() == [3, 0, 1, 2]


def test_pareto_front_skips_nan_and_unfinished_rows() -> None:
    df = pd.DataFrame(
        {
            "state": ["COMPLETE", "PRUNED", "COMPLETE", "RUNNING"],
            "accuracy": [90.0, 99.0, np.nan, 99.5],
            "latency_ms": [3.0, 1.0, 0.5, 0.1],
        }
    )
    front = pareto_front(df, {"accuracy": "max", "latency_ms": "min"})
    assert front.index.tolist() == [0]


def test_pareto_front_empty_input() -> None:
    df = pd.DataFrame({"accuracy": pd.Series([], dtype=float), "latency_ms": []})
    assert pareto_front(df, {"accuracy": "max", "latency_ms": "min"}).empty


def test_pareto_front_zero_and_negative_zero_are_ties() -> None:
    df = pd.DataFrame({"a": [0.0, -0.0], "b": [1.0, 1.0]})
    assert len(pareto_front(df, {"a": "max", "b": "min"})) == 2


def test_pareto_front_unknown_column() -> None:
    df = pd.DataFrame({"accuracy": [1.0], "latency_ms": [1.0]})
    with pytest.raises(ValueError, match=r"'latency' is not a column.*available.*latency_ms"):
        pareto_front(df, {"accuracy": "max", "latency": "min"})


def test_pareto_front_bad_direction() -> None:
    df = pd.DataFrame({"accuracy": [1.0]})
    with pytest.raises(ValueError, match=r"direction for objective 'accuracy' must be one of "
                                         r"\['max', 'min'\], but got 'up'"):
        pareto_front(df, {"accuracy": "up"})


def test_pareto_front_needs_objectives() -> None:
    with pytest.raises(ValueError, match="non-empty mapping"):
        pareto_front(pd.DataFrame({"a": [1.0]}), {})


def test_direction_parse_accepts_optuna_spelling() -> None:
    assert Direction.parse("MAXIMIZE") is Direction.MAX
    assert Direction.parse("minimize") is Direction.MIN


# --------------------------------------------------------------------------------------------
# hypervolume
# --------------------------------------------------------------------------------------------

OBJ2 = {"accuracy": "max", "latency_ms": "min"}
REF2 = {"accuracy": 80.0, "latency_ms": 10.0}


def test_hypervolume_2d_single_point() -> None:
    df = pd.DataFrame({"accuracy": [90.0], "latency_ms": [4.0]})
    assert hypervolume(df, OBJ2, REF2) == pytest.approx(10.0 * 6.0)


def test_hypervolume_2d_staircase_by_hand() -> None:
    # Two boxes 10x6 and 15x2 overlapping in 10x2: 60 + 30 - 20 = 70; the dominated point and
    # the duplicate add nothing; the point worse than the reference adds nothing.
    df = pd.DataFrame(
        {
            "accuracy": [90.0, 95.0, 85.0, 95.0, 99.0, 79.0],
            "latency_ms": [4.0, 8.0, 9.0, 8.0, 12.0, 1.0],
        }
    )
    assert hypervolume(df, OBJ2, REF2) == pytest.approx(70.0)


def test_hypervolume_point_on_reference_boundary_adds_nothing() -> None:
    df = pd.DataFrame({"accuracy": [80.0, 90.0], "latency_ms": [1.0, 10.0]})
    assert hypervolume(df, OBJ2, REF2) == 0.0


def test_hypervolume_1d() -> None:
    df = pd.DataFrame({"accuracy": [90.0, 95.0]})
    assert hypervolume(df, {"accuracy": "max"}, {"accuracy": 80.0}) == pytest.approx(15.0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_obj", [2, 3, 4])
def test_hypervolume_matches_grid_count(seed: int, n_obj: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 6, size=(12, n_obj)).astype(float)
    reference = np.full(n_obj, 6.0)
    objectives = {f"o{j}": "min" for j in range(n_obj)}
    df = pd.DataFrame(points, columns=list(objectives))
    expected = _grid_hypervolume(points, reference)
    assert hypervolume(df, objectives, dict(zip(objectives, reference, strict=True))) == (
        pytest.approx(expected)
    )
    # Negating a column and flipping its direction describes the same set.
    df_max = df.assign(o0=-df["o0"])
    ref_max = dict(zip(objectives, reference, strict=True)) | {"o0": -reference[0]}
    assert hypervolume(df_max, objectives | {"o0": "max"}, ref_max) == pytest.approx(expected)


def test_hypervolume_missing_reference() -> None:
    df = pd.DataFrame({"accuracy": [90.0], "latency_ms": [4.0]})
    with pytest.raises(ValueError, match="reference has no value for objective 'latency_ms'"):
        hypervolume(df, OBJ2, {"accuracy": 80.0})


def test_hypervolume_reference_not_finite() -> None:
    df = pd.DataFrame({"accuracy": [90.0], "latency_ms": [4.0]})
    with pytest.raises(ValueError, match=r"reference\['latency_ms'\] must be a finite number"):
        hypervolume(df, OBJ2, {"accuracy": 80.0, "latency_ms": float("inf")})


# --------------------------------------------------------------------------------------------
# feasible / select_best / nearest_feasible
# --------------------------------------------------------------------------------------------


def _trials() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "number": [0, 1, 2, 3, 4, 5, 6],
            "state": ["COMPLETE", "COMPLETE", "COMPLETE", "COMPLETE", "FAIL", "COMPLETE",
                      "COMPLETE"],
            "accuracy": [97.0, 97.0, 96.0, 99.0, np.nan, np.nan, 97.0],
            "latency_ms": [4.0, 3.0, 2.0, 9.0, 1.0, 6.0, 3.0],
            "size_mb": [1.0, 1.5, 0.5, 4.0, 0.1, 3.0, 1.2],
        },
        index=[10, 11, 12, 13, 14, 15, 16],
    )


def test_feasible() -> None:
    ok = feasible(_trials(), {"latency_ms": 5.0, "size_mb": 2.0})
    assert ok.tolist() == [True, True, True, False, False, False, True]
    assert ok.index.equals(_trials().index)


def test_feasible_nan_value_is_not_feasible_and_none_limit_is_ignored() -> None:
    df = pd.DataFrame({"state": ["COMPLETE", "COMPLETE"], "latency_ms": [np.nan, 1.0],
                       "size_mb": [9.0, 9.0]})
    assert feasible(df, {"latency_ms": 5.0, "size_mb": None}).tolist() == [False, True]


def test_feasible_without_constraints_is_every_complete_row() -> None:
    assert feasible(_trials(), None).sum() == 6


def test_feasible_unknown_column() -> None:
    with pytest.raises(ValueError, match=r"constraint 'mmacs' is not a column.*available columns"):
        feasible(_trials(), {"mmacs": 5.0})


def test_feasible_bad_limit() -> None:
    with pytest.raises(ValueError, match="constraint 'latency_ms' must be a finite number"):
        feasible(_trials(), {"latency_ms": "fast"})


def test_select_best_highest_accuracy_ties_to_lower_latency_then_size() -> None:
    # #0, #1 and #6 tie on 97.0; #1 and #6 tie on 3.0 ms; #6 is smaller.
    best = select_best(_trials(), {"latency_ms": 5.0, "size_mb": 2.0})
    assert best is not None and best["number"] == 6
    assert best.name == 16


def test_select_best_ties_to_lower_number() -> None:
    df = _trials()
    df.loc[16, "size_mb"] = 1.5
    assert select_best(df, {"latency_ms": 5.0})["number"] == 1


def test_select_best_budget_excludes_the_most_accurate() -> None:
    assert select_best(_trials(), {"latency_ms": 10.0})["number"] == 3
    assert select_best(_trials(), {"latency_ms": 5.0})["number"] == 6


def test_select_best_max_drop_picks_fastest_within_drop() -> None:
    df = _trials()
    best = select_best(df, {"latency_ms": 5.0}, max_drop=2.0, reference_accuracy=98.5)
    assert best["number"] == 6  # 96.0 is below 96.5; 3.0 ms ties go to accuracy, then size
    best = select_best(df, {"latency_ms": 5.0}, max_drop=3.0, reference_accuracy=98.5)
    assert best["number"] == 2


def test_select_best_none_qualifies() -> None:
    assert select_best(_trials(), {"latency_ms": 0.5}) is None
    assert select_best(_trials(), {}, max_drop=0.1, reference_accuracy=100.0) is None


def test_select_best_max_drop_needs_reference() -> None:
    with pytest.raises(ValueError, match="max_drop needs reference_accuracy"):
        select_best(_trials(), {"latency_ms": 5.0}, max_drop=1.0)


def test_select_best_negative_max_drop() -> None:
    with pytest.raises(ValueError, match=r"`max_drop >= 0` must hold, but got max_drop=-1"):
        select_best(_trials(), {}, max_drop=-1.0, reference_accuracy=99.0)


def test_nearest_feasible_orders_by_relative_violation() -> None:
    df = _trials()
    near = nearest_feasible(df, {"latency_ms": 2.5, "size_mb": 1.0}, k=3)
    # violations: #0 0.6, #1 0.5, #2 -0.2 (within), #3 3.0, #4 failed (skipped), #5 2.0, #6 0.2
    assert near["number"].tolist() == [2, 6, 1]
    assert near["violation"].tolist() == pytest.approx([-0.2, 0.2, 0.5])
    assert "violation" not in df.columns


def test_nearest_feasible_keeps_unfinetuned_rows_and_skips_unmeasured() -> None:
    df = pd.DataFrame({"number": [0, 1, 2], "state": ["COMPLETE"] * 3,
                       "accuracy": [np.nan, np.nan, np.nan], "latency_ms": [6.0, np.nan, 7.5]})
    near = nearest_feasible(df, {"latency_ms": 5.0})
    assert near["number"].tolist() == [0, 2]
    assert near["violation"].tolist() == pytest.approx([0.2, 0.5])


def test_nearest_feasible_without_constraints_is_empty() -> None:
    near = nearest_feasible(_trials(), {})
    assert near.empty and "violation" in near.columns


def test_nearest_feasible_errors() -> None:
    with pytest.raises(ValueError, match="constraint 'latency_ms' must be > 0"):
        nearest_feasible(_trials(), {"latency_ms": 0.0})
    with pytest.raises(ValueError, match=r"`k >= 1` must hold, but got k=0"):
        nearest_feasible(_trials(), {"latency_ms": 1.0}, k=0)


def _ties_table() -> pd.DataFrame:
    return pd.DataFrame({
        "number": [0, 1, 2, 3, 4, 5, 6],
        "state": ["COMPLETE"] * 6 + ["FAIL"],
        "accuracy": [95.4, 95.3, 95.2, 94.9, 95.35, 95.3, 95.4],
        "accuracy_se": [0.3] * 7,
        "latency_ms": [2.2, 1.6, 1.2, 1.0, 2.4, 6.0, 1.0],
        "size_mb": [11.0, 4.0, 3.0, 2.0, 12.0, 1.0, 1.0],
    })


def test_near_ties_are_within_one_se_no_slower_no_larger_and_on_their_own_front() -> None:
    df = _ties_table()
    chosen = select_best(df, {"latency_ms": 5.0})
    assert int(chosen["number"]) == 0
    ties = near_ties(df, {"latency_ms": 5.0}, chosen)
    # 1 and 2 tie within 0.3 points and are cheaper; 2 is faster but less accurate, so both stay.
    # 3 is 0.5 points behind, 4 slower, 5 over the budget, 6 failed.
    assert ties["number"].tolist() == [2, 1]
    assert near_ties(df, {"latency_ms": 5.0}, chosen, k=1)["number"].tolist() == [2]


def test_near_ties_need_a_standard_error() -> None:
    df = _ties_table().drop(columns="accuracy_se")
    chosen = select_best(df, {"latency_ms": 5.0})
    assert near_ties(df, {"latency_ms": 5.0}, chosen).empty

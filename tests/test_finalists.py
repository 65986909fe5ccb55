"""Choosing with the deployed figure: effective latency, budget verdicts, re-choice, noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from autoshrink.finalists import (
    EFFECTIVE,
    SOURCE,
    choose,
    effective_front,
    effective_hypervolume,
    merge_deployed,
    noise_note,
    rechoose,
    to_retime,
    with_effective_latency,
    within_noise,
)
from autoshrink.frontier import select_best
from autoshrink.measure.remeasure import spread, time_interleaved

BUDGET = {"latency_ms": 5.0}


def _trials() -> pd.DataFrame:
    # 0: most accurate, just under the budget at the gate; 1: next, clearly under; 2: over the budget;
    # 3: dominated at the gate (slower and less accurate than 0), under the budget
    return pd.DataFrame({
        "number": [0, 1, 2, 3],
        "state": ["COMPLETE"] * 4,
        "accuracy": [95.0, 94.0, 96.0, 94.5],
        "accuracy_se": [0.3] * 4,
        "latency_ms": [4.8, 3.9, 6.5, 4.9],
        "size_mb": [1.0, 0.8, 2.0, 1.1],
        "meets_budget": [True, True, False, True],
    })


class FakeClock:
    """A clock that only moves when a fake model runs: each call takes its model's latency."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def model(self, ms: float, jitter: float, seed: int):
        rng = np.random.default_rng(seed)

        def run(_x):
            self.now += max(ms + rng.normal(0, jitter), 0.01) / 1e3

        return run


def _fake_measure(latencies: dict[int, float], calls: list[list[int]]):
    """``measure`` for :func:`rechoose`: times fake models through the real interleaved loop."""

    def measure(numbers: list[int]) -> dict:
        calls.append(list(numbers))
        clock = FakeClock()
        models = [clock.model(latencies[n], 0.02, seed=n) for n in numbers]
        times = time_interleaved(models, torch.zeros(1, 1), rounds=5, runs=8, warmup=2, timer=clock)
        return {n: spread(t).columns() for n, t in zip(numbers, times, strict=True)}

    return measure


def test_effective_latency_prefers_deployed_and_recomputes_the_budget():
    df = merge_deployed(_trials(), {0: {"latency_ms_deployed": 5.2, "latency_deployed_p90_ms": 5.6}})
    out = with_effective_latency(df, BUDGET)
    assert out[EFFECTIVE].tolist() == [5.2, 3.9, 6.5, 4.9]
    assert out[SOURCE].tolist() == ["deployed", "gate", "gate", "gate"]
    assert out["meets_budget"].tolist() == [False, True, False, True]
    assert out["meets_budget_gate"].tolist() == [True, True, False, True]
    assert out["latency_ms"].tolist() == _trials()["latency_ms"].tolist()  # the gate figure stays


def test_front_and_hypervolume_use_the_effective_latency():
    df = merge_deployed(_trials(), {0: {"latency_ms_deployed": 5.2}})
    front = effective_front(df, BUDGET)
    # at 5.2 ms, trial 0 no longer dominates trial 3 (4.9 ms, 94.5 %)
    assert sorted(front["number"]) == [0, 1, 2, 3]
    ref = {"accuracy": 90.0, "latency_ms": 7.0}
    assert effective_hypervolume(df, ref) < effective_hypervolume(_trials(), ref)


def test_faked_retiming_that_misses_the_budget_changes_the_choice():
    trials = _trials()
    assert int(select_best(trials, BUDGET)["number"]) == 0  # the gate's choice
    calls: list[list[int]] = []
    # as shipped, trial 0 takes 5.3 ms: over the budget; trial 3 (never on the gate's front) 4.7 ms
    out = rechoose(trials, BUDGET, _fake_measure({0: 5.3, 1: 4.0, 3: 4.7}, calls))
    assert calls[0] == [0, 1]  # first round: the gate front's feasible members and the chosen one
    assert calls[1] == [3]  # the next best rested on a gate figure: re-timed before being chosen
    assert int(out.chosen["number"]) == 3
    assert out.chosen[SOURCE] == "deployed"
    assert abs(out.chosen["latency_ms_deployed"] - 4.7) < 0.05
    row0 = out.trials.set_index("number").loc[0]
    assert row0["meets_budget"] == False  # noqa: E712
    assert abs(row0["latency_ms_deployed"] - 5.3) < 0.05
    assert row0["latency_deployed_p25_ms"] <= row0["latency_ms_deployed"] <= row0["latency_deployed_p75_ms"]
    assert row0["latency_deployed_ci_low_ms"] <= row0["latency_ms_deployed"] <= row0["latency_deployed_ci_high_ms"]
    assert any("trial 0, chosen on its gate latency 4.800 ms" in n and "trial 3 is chosen" in n
               for n in out.notes)


def test_retiming_that_confirms_the_gate_keeps_the_choice():
    calls: list[list[int]] = []
    out = rechoose(_trials(), BUDGET, _fake_measure({0: 4.75, 1: 3.95, 3: 4.9}, calls))
    assert len(calls) == 1
    assert int(out.chosen["number"]) == 0
    assert out.notes == []


def test_a_failed_retiming_is_noted_and_not_retried():
    calls: list[list[int]] = []

    def measure(numbers):
        calls.append(numbers)
        return {n: "FileNotFoundError: model.pt2" for n in numbers}

    out = rechoose(_trials(), BUDGET, measure)
    assert len(calls) == 1
    assert int(out.chosen["number"]) == 0
    assert any("trial 0: could not be re-timed" in n for n in out.notes)
    assert any("chosen on its gate latency: its shipped artifact was not re-timed" in n for n in out.notes)


def test_max_drop_chooses_the_fastest_on_the_effective_figure():
    df = merge_deployed(_trials(), {1: {"latency_ms_deployed": 4.95}})
    row = choose(df, BUDGET, max_drop=2.0, reference_accuracy=96.0)
    assert int(row["number"]) == 0  # 4.8 (gate) < 4.95 (deployed)
    assert to_retime(df, BUDGET, max_drop=2.0, reference_accuracy=96.0) == [0]  # 1 is done, 3 dominated


def test_merge_rejects_unknown_numbers_and_columns():
    with pytest.raises(ValueError, match="deployed-latency figures for trial 9, which is not in the trials"):
        merge_deployed(_trials(), {9: {"latency_ms_deployed": 1.0}})
    with pytest.raises(ValueError, match="'latency_ms' is not a deployed-latency column"):
        merge_deployed(_trials(), {0: {"latency_ms": 1.0}})


def test_within_noise():
    assert within_noise(5.0, (4.9, 5.05))
    assert within_noise(5.0, (5.0, 5.2))
    assert not within_noise(5.0, (4.2, 4.6))
    assert not within_noise(5.0, (float("nan"), 5.1))
    assert not within_noise(None, (4.9, 5.1))
    row = pd.Series({"number": 0, "latency_ms_deployed": 4.97,
                     "latency_deployed_ci_low_ms": 4.9, "latency_deployed_ci_high_ms": 5.05})
    assert "within the noise" in noise_note(row, 5.0)
    assert noise_note(row, 6.0) is None


def test_a_row_over_the_budget_does_not_hide_one_under_it():
    df = pd.DataFrame({"number": [0, 1], "state": ["COMPLETE"] * 2, "accuracy": [96.0, 95.0],
                       "latency_ms": [4.0, 4.5], "size_mb": [3.0, 1.0]})
    # 0 dominates 1 on accuracy and latency, but is over the size limit
    assert to_retime(df, {"latency_ms": 5.0, "size_mb": 2.0}) == [1]


def test_near_ties_compare_effective_latencies():
    from autoshrink.finalists import effective_near_ties

    df = merge_deployed(_trials(), {0: {"latency_ms_deployed": 4.85}, 1: {"latency_ms_deployed": 4.9}})
    chosen = choose(df, BUDGET)
    assert int(chosen["number"]) == 0
    # trial 3 (94.5 %, gate 4.9 ms) is not within one SE (0.3) of 95.0; trial 1 is not; nothing is listed
    assert effective_near_ties(df, BUDGET, chosen).empty
    df2 = merge_deployed(df, {3: {"latency_ms_deployed": 4.7}})
    df2.loc[df2["number"] == 3, ["accuracy", "size_mb"]] = [94.8, 0.9]  # within one SE, no larger
    assert effective_near_ties(df2, BUDGET, choose(df2, BUDGET))["number"].tolist() == [3]


def test_figures_from_a_json_study_attribute_merge_by_number():
    import json

    stored = json.loads(json.dumps({1: {"latency_ms_deployed": 4.1}, 3: {"latency_ms_deployed": 4.6}}))
    df = merge_deployed(_trials(), stored)  # string keys, as Optuna gives a study attribute back
    assert df["latency_ms_deployed"].tolist()[1] == 4.1 and df["latency_ms_deployed"].tolist()[3] == 4.6
    from autoshrink.finalists import merge_test_scores

    scores = {"0": {"test_accuracy": 94.2, "test_accuracy_se": 0.5}, "1": {"test_accuracy": None}}
    scored = merge_test_scores(df, scores)
    assert scored["test_accuracy"].tolist()[0] == 94.2 and np.isnan(scored["test_accuracy"].tolist()[1])
    with pytest.raises(ValueError, match="'accuracy' is not a test-split column"):
        merge_test_scores(df, {0: {"accuracy": 1.0}})


def test_front_and_chosen_are_scored_once_on_the_test_split():
    from autoshrink.finalists import merge_test_scores, score_test_split

    out = rechoose(_trials(), BUDGET, _fake_measure({0: 5.3, 1: 4.0, 3: 4.7}, []))
    scored: list[int] = []

    def score(n):
        scored.append(n)
        if n == 2:
            raise FileNotFoundError("trials/0002/model.pt2")
        return 90.0 + n, 0.4

    scores, notes = score_test_split(out, score, BUDGET)
    assert sorted(scored) == sorted(set(effective_front(out.trials, BUDGET)["number"]) | {3})
    assert scores[3] == {"test_accuracy": 93.0, "test_accuracy_se": 0.4}
    assert notes == ["trial 2: not scored on the test split (FileNotFoundError: trials/0002/model.pt2)"]
    table = merge_test_scores(out.trials, scores)
    assert table.set_index("number").loc[3, "test_accuracy"] == 93.0

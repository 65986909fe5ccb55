"""One small real search with a test split: the shipped model, re-timed again in another fresh
process, lands inside the spread that ``best/metrics.json`` reports; the report shows test accuracy."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_the_shipped_model_re_timed_in_a_fresh_process_lands_inside_the_reported_spread(finished_search):
    from autoshrink.measure.remeasure import remeasure

    _, out, task = finished_search  # the suite's shared finished search, with a test split
    saved = json.loads((out / "best" / "metrics.json").read_text())
    m = saved["trial"]
    assert m["latency_source"] == "deployed"  # the chosen model's figure is the shipped artifact's
    assert m["test_accuracy"] is not None and 0 < m["test_accuracy"] <= 100 and m["test_accuracy_se"] > 0
    low = min(m["latency_deployed_p25_ms"], m["latency_deployed_ci_low_ms"])
    high = max(m["latency_deployed_p90_ms"], m["latency_deployed_ci_high_ms"])
    # a shared machine drifts between processes: the reported spread, with a margin for that; wider
    # below (faster than reported is the safe side, and interference only adds time: an AVX2 EPYC
    # here read 0.354 ms against a reported p25 of 0.534 in one whole-suite run of three). Load from
    # the rest of the suite only adds time too (one whole-suite run read 0.953 ms against a reported
    # p90 of 0.577 on its first e2e test), so a re-timing above the band is repeated, in a new fresh
    # process each time, up to three in all, and the fastest counts, as
    # ``experiments/check_runtime_export.py --tries`` does
    medians = []
    for _ in range(3):
        again = remeasure([out / "best" / "model.pt2"], task.example_input, rounds=5, runs=10)
        medians.append(again.spreads[str(out / "best" / "model.pt2")].median_ms)
        if min(medians) <= 1.33 * high:
            break
    median = min(medians)
    assert 0.5 * low <= median <= 1.33 * high, (medians, low, high)
    report = (out / "report.md").read_text()
    assert "test accuracy (the test split, never used to choose)" in report
    assert "re-timed in a fresh process" in report

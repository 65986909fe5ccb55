"""One real end-to-end search: tiny model, real data, 3 trials through Optuna and Ray."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd
import pytest

import autoshrink as ash
from autoshrink.record import State, StudyAttr


@pytest.fixture(scope="module")
def run(finished_search):
    """The suite's one shared finished search (tests/conftest.py): 50 ms and 0.0125 MB, 3 trials."""
    result, out, _ = finished_search
    return result, out


def test_search_writes_the_run_folder(run):
    result, out = run
    for name in ("study.db", "trials.csv", "pareto.png", "pareto.html", "report.md"):
        assert (out / name).is_file(), name
    df = pd.read_csv(out / "trials.csv")
    # trials=3 counts fine-tuned candidates; those over the budget are recorded on top, unfine-tuned
    screened = (df["state"] == State.COMPLETE) & (df["meets_budget"] == False) & (df["finetune_s"] == 0)  # noqa: E712
    assert (~screened).sum() == 3 and len(df) <= 3 + 4 * 3
    for col in ("number", "state", "accuracy", "latency_ms", "size_mb", "mmacs", "bops", "params",
                "meets_budget", "finetune_s", "error"):
        assert col in df.columns
    assert any(c.startswith("param_") for c in df.columns)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trials_are_real_measurements(run):
    result, _ = run
    df = result.trials
    assert set(df["state"]) <= {State.COMPLETE, State.PRUNED, State.FAIL}
    assert (df["state"] == State.FAIL).sum() == 0, df["error"].tolist()
    done = df[df["state"] == State.COMPLETE]
    assert (done["mmacs"] > 0).all() and (done["size_mb"] > 0).all()
    # latency is timed unless a static limit (size, MACs) already failed: no work is wasted
    timed = done[done["size_mb"] <= 0.0125]
    assert (timed["latency_ms"] > 0).all()
    # infeasible trials are measured but never fine-tuned
    infeasible = done[done["meets_budget"] == False]  # noqa: E712
    assert (infeasible["finetune_s"] == 0).all()
    assert infeasible["accuracy"].isna().all()
    feasible = done[done["meets_budget"] == True]  # noqa: E712
    assert (feasible["finetune_s"] > 0).all()
    assert feasible["accuracy"].between(0, 100).all()


def test_best_model_loads_in_another_process(run):
    result, out = run
    best = result.best
    if best is None:
        pytest.skip("no trial met the (tight) size budget in this run")
    assert (out / "best" / "model.pt2").is_file()
    cand = json.loads((out / "best" / "candidate.json").read_text())
    assert ash.Candidate.from_dict(cand)
    code = (
        "import torch, sys\n"
        "import torch.ao.quantization.fx._decomposed  # registers the int8 ops, part of torch\n"
        "m = torch.export.load(sys.argv[1]).module()\n"
        "print(m(torch.zeros(3, 1, 32, 32)).shape[1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out / "best" / "model.pt2")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "10"


def test_load_reopens_the_same_result(run):
    result, out = run
    again = ash.load(out)
    pd.testing.assert_frame_equal(again.trials, result.trials)
    assert again.teacher["accuracy"] == pytest.approx(result.teacher["accuracy"])
    assert again.teacher["latency_ms"] > 0


def test_the_budget_edge_is_tried_first(run, tiny_space):
    # before the search, uniform int8 pruning ratios are measured (no fine-tuning) to find the
    # smallest one that meets the budget: the hand-tuned baseline, enqueued first
    import optuna

    from autoshrink.search import baselines, space_defaults

    result, out = run
    study = optuna.load_study(study_name="autoshrink", storage=f"sqlite:///{out / 'study.db'}")
    found = study.user_attrs[StudyAttr.BUDGET_EDGE]
    assert not found["error"] and found["probes"]
    for ratio, latency, size, _, ok in found["probes"]:
        # a probe over the size limit is not timed: it cannot meet the budget at any speed
        assert (latency is None) == (size > 0.0125)
        assert ok == (size <= 0.0125 and latency <= 50.0)
        assert ok == (found["prune"] is not None and ratio >= found["prune"])
    first = result.trials.sort_values("number").iloc[0]
    params = tiny_space.candidate_params(baselines(tiny_space, space_defaults(tiny_space), found["prune"])[0])
    assert {k: first[f"param_{k}"] for k in params} == params


def test_the_solver_proposals_follow_the_budget_edge(run):
    # the solver's proposals (sensitivity x latency table) come right after the budget-edge
    # baseline, each marked, and the study records what the solver did
    import optuna

    from autoshrink.record import Proposer, TrialAttr

    _, out = run
    study = optuna.load_study(study_name="autoshrink", storage=f"sqlite:///{out / 'study.db'}")
    found = study.user_attrs[StudyAttr.SOLVER]
    assert not found["warning"], found
    assert 1 <= len(found["proposals"]) <= 3 and found["seconds"] > 0
    assert found["latency_binds"] is False  # 50 ms: only the proposals' layers were timed
    for proposal in found["proposals"]:
        assert proposal["drop"] >= 0 and proposal["predicted"]["size_mb"] <= 0.0125 + 1e-9
    origins = [t.user_attrs.get(TrialAttr.PROPOSED_BY) for t in sorted(study.trials, key=lambda t: t.number)]
    enqueued = [o for o in origins if o is not None]
    # the edge baseline, then the proposals, then (if trials were left) the other baselines
    pattern = "".join("s" if o == Proposer.SOLVER else "b" for o in enqueued)
    assert re.fullmatch(r"bs+b*", pattern), enqueued
    assert origins[:len(enqueued)] == enqueued  # before any sampled trial


def test_the_report_compares_the_choice_with_the_hand_baseline(run):
    result, out = run
    assert result.baseline is not None, result.trials[["number", "state", "meets_budget", "error"]]
    row, how = result.baseline
    assert row["number"] == 0 and how.startswith("uniform int8")
    text = (out / "report.md").read_text()
    assert result.best is not None  # trial 0 itself meets the budget
    assert "hand baseline (trial #0, uniform int8" in text or "is the hand baseline (uniform int8" in text


def test_the_plan_lists_every_layer_the_head_included(run):
    result, _ = run
    n = int(result.trials[result.trials["state"] == State.COMPLETE].iloc[0]["number"])
    plan = {layer["layer"]: layer for layer in result.layer_plan(n)}
    assert "conv1" in plan and "fc" in plan  # the head is never pruned, but it is quantized
    assert plan["fc"]["channels_before"] == plan["fc"]["channels_after"] == 10
    assert abs(sum(layer["macs_share"] for layer in plan.values()) - 1) < 0.05


def test_a_time_limit_finishes_the_trial_in_flight_and_starts_no_more(second_search, tiny_task, tiny_space,
                                                                      tmp_path):
    result, _, seconds = second_search  # tests/conftest.py: 3 trials asked for, minutes=1e-4
    ran = result.trials[result.trials["state"] != State.WAITING]
    assert len(ran) == 1 and ran["state"].iloc[0] == State.COMPLETE
    assert result.meta["timed_out"] is True
    assert seconds < 300
    with pytest.raises(ValueError, match="minutes must be a positive number"):
        ash.search(tiny_task, tiny_space, trials=1, out=tmp_path / "x", minutes=0)

"""`load` of a run folder, finished or interrupted, from a study.db built by hand with Optuna: the
trials table, the front, the chosen trial (budget and ``max_drop`` modes), the nearest trials
when nothing meets the budget, and the files ``write()`` produces."""

from __future__ import annotations

import math

import optuna
import pandas as pd
import pytest

import autoshrink as ash
from autoshrink.cli import main
from autoshrink.record import STUDY_DIRECTIONS, State, StudyAttr, TrialAttr
from autoshrink.result import COLUMNS

TEACHER = {"accuracy": 98.0, "accuracy_se": 0.3, "latency_ms": 6.0, "latency_ms_eager": 9.0,
           "size_mb": 0.8, "mmacs": 40.0, "params": 200000}
DIST = {
    "bits.stage1": optuna.distributions.CategoricalDistribution([4, 8, 32]),
    "prune.stage1": optuna.distributions.CategoricalDistribution([0.0, 0.25, 0.5]),
    "kd_temperature": optuna.distributions.FloatDistribution(1.0, 8.0),
}
LAYERS = [
    {"layer": "conv1", "bits": 32, "channels_before": 16, "channels_after": 16, "mmacs": 3.0},
    {"layer": "layer1.0.conv1", "bits": 8, "channels_before": 32, "channels_after": 24, "mmacs": 9.0},
]


def _complete(number, bits, prune, accuracy, latency_ms, size_mb, *, meets=True):
    """A COMPLETE trial as the driver records it (a missed budget: measured, never fine-tuned)."""
    attrs = {
        TrialAttr.LATENCY_MS: latency_ms, TrialAttr.LATENCY_IQR_MS: 0.05, TrialAttr.SIZE_MB: size_mb,
        TrialAttr.MMACS: 40.0 * (1 - prune) ** 2, TrialAttr.BOPS: 1e9 * bits, TrialAttr.PARAMS: 150000,
        TrialAttr.MEETS_BUDGET: meets, TrialAttr.COMPRESS_S: 0.1, TrialAttr.MEASURE_S: 2.0,
        TrialAttr.CANDIDATE: ash.Candidate.uniform(bits=bits, prune=prune).to_dict(), TrialAttr.LAYERS: LAYERS,
    }
    if meets:
        attrs.update({TrialAttr.ACCURACY: accuracy, TrialAttr.ACCURACY_SE: 0.25, TrialAttr.FINETUNE_S: 30.0,
                      TrialAttr.EVALUATE_S: 1.0})
    return optuna.trial.create_trial(
        params={"bits.stage1": bits, "prune.stage1": prune, "kd_temperature": 4.0},
        distributions=DIST,
        values=[accuracy if meets else 0.0, latency_ms],
        user_attrs=attrs,
    )


def _make_run(out, budget: dict, trials: list, *, running: bool = True, max_drop=None):
    """A run folder holding only study.db, as a driver killed mid-search leaves it: ``trials``,
    then two failed ones, and with ``running`` a pruned one and one left RUNNING."""
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="autoshrink",
                                directions=STUDY_DIRECTIONS)
    for key, value in {StudyAttr.BUDGET: budget, StudyAttr.TEACHER: TEACHER, StudyAttr.TASK: "tiny",
                       StudyAttr.SAMPLER: "tpe", StudyAttr.SEED: 0, StudyAttr.TRIALS: 12,
                       StudyAttr.MAX_DROP: max_drop}.items():
        study.set_user_attr(key, value)
    for trial in trials:
        study.add_trial(trial)
    study.add_trial(optuna.trial.create_trial(
        state=State.FAIL.optuna, params={"bits.stage1": 4, "prune.stage1": 0.5,
                                                    "kd_temperature": 2.0},
        distributions=DIST, user_attrs={TrialAttr.ERROR: "RuntimeError: out of memory while compiling"}))
    study.add_trial(optuna.trial.create_trial(state=State.FAIL.optuna))
    if not running:
        return out
    study.add_trial(optuna.trial.create_trial(
        state=State.PRUNED.optuna, params={"bits.stage1": 8, "prune.stage1": 0.5,
                                                      "kd_temperature": 2.0},
        distributions=DIST, user_attrs={TrialAttr.LATENCY_MS: 2.5, TrialAttr.SIZE_MB: 0.2,
                                        TrialAttr.FINETUNE_S: 8.0}))
    # the driver died while this trial was fine-tuning
    trial = study.ask()
    trial.set_user_attr(TrialAttr.DRIVER, "elsewhere:1")
    trial.set_user_attr(TrialAttr.LATENCY_MS, 3.3)
    return out


@pytest.fixture
def interrupted(tmp_path):
    """Budget 5 ms: #0 and #1 and #3 meet it, #2 misses it, #4/#5 failed, #6 pruned, #7 running."""
    return _make_run(tmp_path / "run", {"latency_ms": 5.0}, [
        _complete(0, 8, 0.0, 97.0, 4.0, 0.2),
        _complete(1, 8, 0.5, 95.0, 2.0, 0.1),
        _complete(2, 32, 0.0, None, 8.0, 0.8, meets=False),
        _complete(3, 8, 0.25, 96.5, 3.0, 0.15),
    ])


@pytest.fixture
def infeasible(tmp_path):
    """Budget 1 ms and 0.12 MB: no trial meets it (none was fine-tuned)."""
    return _make_run(tmp_path / "none", {"latency_ms": 1.0, "size_mb": 0.12}, [
        _complete(0, 8, 0.0, None, 4.0, 0.2, meets=False),
        _complete(1, 8, 0.5, None, 1.5, 0.1, meets=False),
        _complete(2, 32, 0.0, None, 8.0, 0.8, meets=False),
    ], running=False)


def test_load_interrupted_run_trials(interrupted):
    result = ash.load(interrupted)
    df = result.trials
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert {"param_bits.stage1", "param_prune.stage1", "param_kd_temperature"} <= set(df.columns)
    assert df["number"].tolist() == list(range(8))
    assert df["state"].tolist() == [State.COMPLETE] * 4 + [State.FAIL, State.FAIL, State.PRUNED, State.RUNNING]
    assert df.loc[4, "error"] == "RuntimeError: out of memory while compiling"
    assert df.loc[5, "error"] == "failed without a reason"
    assert (df.loc[[0, 1, 2, 3, 6, 7], "error"] == "").all()
    # missed the budget: measured, never fine-tuned
    assert not df.loc[2, "meets_budget"]
    assert math.isnan(df.loc[2, "accuracy"]) and df.loc[2, "finetune_s"] == 0.0
    # the running trial: nothing finished, its partial measurement kept
    assert math.isnan(df.loc[7, "accuracy"]) and math.isnan(df.loc[7, "finetune_s"])
    assert df.loc[7, "latency_ms"] == 3.3
    assert df.loc[0, "param_bits.stage1"] == 8 and df.loc[1, "param_prune.stage1"] == 0.5
    assert result.teacher == TEACHER and result.budget == ash.Budget(latency_ms=5.0)
    assert result.max_drop is None


def test_frontier_and_best(interrupted):
    result = ash.load(interrupted)
    # #2 has no accuracy (not fine-tuned); failed, pruned and running trials are not results
    assert sorted(result.frontier["number"]) == [0, 1, 3]
    assert int(result.best["number"]) == 0  # the most accurate within 5 ms
    assert result.candidate(3) == ash.Candidate.uniform(bits=8, prune=0.25)
    plan = result.layer_plan(0)
    assert [p["layer"] for p in plan] == ["conv1", "layer1.0.conv1"]
    assert sum(p["macs_share"] for p in plan) == pytest.approx(1.0)
    assert plan[1]["macs_share"] == pytest.approx(0.75)
    with pytest.raises(KeyError, match="no candidate recorded for trial 5"):
        result.candidate(5)


@pytest.mark.parametrize(("max_drop", "expected"), [(2.0, 3), (1.2, 0), (3.0, 1), (0.5, None)])
def test_max_drop_mode_picks_the_fastest_within_the_drop(interrupted, max_drop, expected):
    # teacher 98 %: within 2 points are #0 (97 %, 4 ms) and #3 (96.5 %, 3 ms) -> #3, the fastest
    best = ash.load(interrupted, max_drop=max_drop).best
    assert (None if best is None else int(best["number"])) == expected


def test_max_drop_recorded_in_the_study_is_used(tmp_path):
    out = _make_run(tmp_path / "run", {"latency_ms": 5.0}, [
        _complete(0, 8, 0.0, 97.0, 4.0, 0.2), _complete(1, 8, 0.25, 96.5, 3.0, 0.15),
    ], max_drop=2.0)
    assert ash.load(out).max_drop == 2.0
    assert int(ash.load(out).best["number"]) == 1
    assert int(ash.load(out, max_drop=1.2).best["number"]) == 0  # an explicit value wins


def test_nothing_meets_the_budget(infeasible):
    result = ash.load(infeasible)
    assert result.best is None
    assert result.frontier.empty
    near = result.nearest()
    # #1: 1.5 ms (+50 %), 0.1 MB; #0: 4 ms (+300 %); #2: 8 ms (+700 %); failed ones left out
    assert near["number"].tolist() == [1, 0, 2]
    assert near["violation"].tolist() == pytest.approx([0.5, 3.0, 7.0])


def test_write_interrupted_run(interrupted):
    result = ash.load(interrupted)
    files = result.write()
    assert {"trials", "plot", "report"} <= set(files)
    for name in ("trials.csv", "pareto.png", "pareto.html", "report.md"):
        assert (interrupted / name).is_file(), name
    assert "best" not in files  # the hand-made run has no saved models to export
    csv = pd.read_csv(interrupted / "trials.csv")
    assert len(csv) == 8 and csv["state"].tolist()[-1] == State.RUNNING
    assert (interrupted / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (interrupted / "pareto.html").read_text()
    assert "trial #3" in html and "bits.stage1 = 8" in html
    report = (interrupted / "report.md").read_text()
    assert "## Chosen model: trial #0" in report and "No trial meets" not in report
    assert "1.50× speed-up" in report  # teacher 6 ms -> 4 ms


def test_write_says_plainly_when_nothing_meets_the_budget(infeasible):
    files = ash.load(infeasible).write()
    assert "best" not in files and not (infeasible / "best").exists()
    report = (infeasible / "report.md").read_text()
    assert "## No trial meets the budget" in report
    assert "so no model was chosen" in report
    assert "what would have to change" in report
    # the nearest trial first, with the cut it needs
    assert report.index("| #1 |") < report.index("| #0 |") < report.index("| #2 |")
    assert "needs 33% lower latency_ms (1.5 ms → ≤ 1 ms)" in report
    assert "relax the budget to `latency_ms` ≤ 1.5 ms" in report


def test_show_prints_the_nearest_trials(infeasible, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at the terminal width
    assert main(["show", str(infeasible)]) == 0
    out = capsys.readouterr().out
    assert "5 trials: 3 complete (3 missed the budget, not fine-tuned), 2 failed" in out
    assert "failed ×1: RuntimeError: out of memory while compiling" in out
    assert "No trial meets the budget, so no model was chosen." in out
    assert "needs 33% lower latency_ms (1.5 ms → ≤ 1 ms)" in out
    assert out.index("│    #1 │") < out.index("│    #0 │") < out.index("│    #2 │")


def test_show_and_pareto_on_an_interrupted_run(interrupted, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["show", str(interrupted)]) == 0
    out = capsys.readouterr().out
    assert "8 trials: 4 complete (1 missed the budget, not fine-tuned), 1 stopped early, 2 failed, " \
           "1 unfinished" in out
    assert "Pareto front (accuracy ↑, latency ↓): 3 of 8 trials" in out
    assert "Chosen: trial #0 (the most accurate within the budget)" in out
    assert "1.50× faster" in out and "4.00× smaller" in out
    assert "layer1.0.conv1" in out and "32 → 24" in out and "75%" in out
    assert main(["pareto", str(interrupted), "--plot", str(tmp_path / "p.png"),
                 "--html", str(tmp_path / "p.html")]) == 0
    assert (tmp_path / "p.png").is_file() and (tmp_path / "p.html").is_file()
    assert f"wrote {tmp_path / 'p.png'} and {tmp_path / 'p.html'}" in capsys.readouterr().out


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no study.db here"):
        ash.load(tmp_path)
    _make_run(tmp_path / "run", {"latency_ms": 5.0}, [], running=False)
    with pytest.raises(ValueError, match="no study named 'other'"):
        ash.load(tmp_path / "run", study_name="other")

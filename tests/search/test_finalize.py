"""After the trials: the finalists re-timed as shipped (a faked timer), the test split, the warnings.

Fast: a real Optuna study with told trials and no search, Ray or model; the re-timing is faked.
"""

from __future__ import annotations

import json
import math
import types

import optuna
import pandas as pd
import pytest

import autoshrink as ash
from autoshrink.finalists import DEPLOYED
from autoshrink.record import STUDY_DIRECTIONS, Reason, State, StudyAttr, TrialAttr
from autoshrink.result import load
from autoshrink.search.finalize import NO_TEST_SPLIT, artifact_path, finalize

BUDGET = ash.Budget(latency_ms=5.0)


def _study(out, trials):
    """A run folder with a study of COMPLETE trials ``(accuracy, latency_ms)``, each with a
    (placeholder) saved artifact: the faked timer never opens it."""
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="autoshrink",
                                directions=STUDY_DIRECTIONS)
    study.set_user_attr(StudyAttr.BUDGET, BUDGET.constraints())
    study.set_user_attr(StudyAttr.TEACHER, {"accuracy": 97.0, "latency_ms": 9.0})
    for acc, lat in trials:
        t = study.ask()
        for key, value in {TrialAttr.ACCURACY: acc, TrialAttr.ACCURACY_SE: 0.3, TrialAttr.LATENCY_MS: lat,
                           TrialAttr.SIZE_MB: 0.1, TrialAttr.MEETS_BUDGET: lat <= 5.0}.items():
            t.set_user_attr(key, value)
        study.tell(t, [acc, lat])
        artifact_path(out, t.number).parent.mkdir(parents=True, exist_ok=True)
        artifact_path(out, t.number).write_bytes(b"placeholder")
        (out / "trials" / f"{t.number:04d}" / "candidate.json").write_text(
            ash.Candidate.uniform(bits=8, prune=0.0).to_json())
    return study


class FakeRetimer:
    """Trial numbers -> deployed figures, from a table; records what it was asked."""

    def __init__(self, deployed: dict[int, float]) -> None:
        self.deployed, self.calls, self.warnings = deployed, [], []

    def __call__(self, numbers):
        self.calls.append(list(numbers))
        return {n: {DEPLOYED: self.deployed[n], "latency_deployed_p25_ms": self.deployed[n] * 0.98,
                    "latency_deployed_p75_ms": self.deployed[n] * 1.02,
                    "latency_deployed_p90_ms": self.deployed[n] * 1.05,
                    "latency_deployed_ci_low_ms": self.deployed[n] * 0.99,
                    "latency_deployed_ci_high_ms": self.deployed[n] * 1.01} for n in numbers}


TASK = types.SimpleNamespace(example_input=None, test_data=None)  # finalize reads only these


def test_the_re_timing_changes_the_choice_when_the_chosen_model_misses_the_budget(tmp_path):
    study = _study(tmp_path, [(95.0, 4.8), (94.0, 4.0), (93.0, 3.0)])
    assert int(load(tmp_path).best["number"]) == 0  # on its gate timing
    retimer = FakeRetimer({0: 5.3, 1: 4.1, 2: 3.1})  # shipped, trial 0 misses the budget
    lines = finalize(TASK, study, BUDGET, tmp_path, retimer=retimer)
    result = load(tmp_path)
    best = result.best
    assert int(best["number"]) == 1
    assert best["latency_source"] == "deployed" and best[DEPLOYED] == pytest.approx(4.1)
    row0 = result.trials.set_index("number").loc[0]
    assert row0["meets_budget"] == False and row0["meets_budget_gate"] == True  # noqa: E712
    assert any("trial 0, chosen on its gate latency 4.800 ms" in line for line in lines)
    assert NO_TEST_SPLIT in result.warnings
    assert sorted(n for call in retimer.calls for n in call) == [0, 1, 2]
    # the files carry both figures
    result.write()
    df = pd.read_csv(tmp_path / "trials.csv")
    for col in ("latency_ms_deployed", "latency_deployed_p25_ms", "latency_deployed_p75_ms",
                "latency_deployed_p90_ms", "latency_ms_effective", "latency_source", "meets_budget_gate",
                "test_accuracy", "test_accuracy_se", "uncounted_ops"):
        assert col in df.columns, col
    assert df.set_index("number").loc[1, "latency_source"] == "deployed"


def test_no_latency_runs_no_re_timing(tmp_path):
    study = _study(tmp_path, [(95.0, 4.8)])
    retimer = FakeRetimer({0: 9.9})
    finalize(TASK, study, BUDGET, tmp_path, latency_runs=0, retimer=retimer)
    assert retimer.calls == [] and StudyAttr.DEPLOYED not in study.user_attrs
    assert int(load(tmp_path).best["number"]) == 0


def test_a_failed_re_timing_is_a_warning_and_the_gate_figure_stands(tmp_path):
    from autoshrink.measure.remeasure import RemeasureError

    study = _study(tmp_path, [(95.0, 4.8)])

    def broken(numbers):
        raise RemeasureError("the re-timing process exited with 1:\nboom")

    lines = finalize(TASK, study, BUDGET, tmp_path, retimer=broken)
    assert any("could not be re-timed as shipped (the re-timing process failed" in line for line in lines)
    best = load(tmp_path).best
    assert int(best["number"]) == 0 and best["latency_source"] == "gate"


def test_the_test_split_scores_the_front_and_the_chosen_model_once(tmp_path, monkeypatch):
    import autoshrink.export

    study = _study(tmp_path, [(95.0, 4.8), (94.0, 4.0), (90.0, 4.5)])  # trial 2 is dominated
    scored = []
    monkeypatch.setattr(autoshrink.export, "load_deployable", lambda path: str(path))

    def evaluate(model, *, fixed_batch, split):
        assert split == "test" and fixed_batch
        scored.append(model)
        return (91.0, 0.5)

    task = types.SimpleNamespace(example_input=None, test_data=object(), evaluate=evaluate)
    finalize(task, study, BUDGET, tmp_path, retimer=FakeRetimer({0: 4.7, 1: 4.0, 2: 4.4}))
    assert sorted(scored) == sorted(str(artifact_path(tmp_path, n)) for n in (0, 1))
    result = load(tmp_path)
    assert result.best["test_accuracy"] == pytest.approx(91.0)
    assert math.isnan(result.trials.set_index("number").loc[2, "test_accuracy"])
    assert NO_TEST_SPLIT not in result.warnings


def test_the_noise_note_names_the_wider_interval_and_reaches_best_metrics(tmp_path):
    study = _study(tmp_path, [(95.0, 4.8)])
    finalize(TASK, study, BUDGET, tmp_path, retimer=FakeRetimer({0: 4.95}))  # p25-p75 4.85-5.05 holds 5
    result = load(tmp_path)
    note = result.noise_note()
    assert note.startswith("within the noise") and "interquartile range (p25-p75)" in note
    best = result.trials.iloc[0]
    # write() exports best/; the placeholder artifact is copied as is
    result.write()
    metrics = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert metrics["noise_note"] == note
    assert metrics["trial"]["latency_ms_deployed"] == pytest.approx(best[DEPLOYED])
    assert NO_TEST_SPLIT in metrics[StudyAttr.WARNINGS]
    assert "within the noise" in (tmp_path / "report.md").read_text()


def test_a_missing_best_folder_is_a_printed_warning(tmp_path, capsys):
    _study(tmp_path, [(95.0, 4.8)])
    artifact_path(tmp_path, 0).unlink()
    result = load(tmp_path)
    result.write()
    assert "warning: best/ not written: trial 0 was chosen but cannot be exported" in capsys.readouterr().err
    assert not (tmp_path / "best").exists()
    assert any("best/ not written" in line for line in load(tmp_path).warnings)
    assert "best/ not written" in (tmp_path / "report.md").read_text()


# -- loud degradation in the driver and the preflight -----------------------------------------
def _driver(tmp_path):
    from autoshrink.search import Driver, DriverConfig

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", directions=STUDY_DIRECTIONS)
    return Driver(task=None, space=None, study=study, config=DriverConfig(budget=BUDGET, out=tmp_path)), study


@pytest.mark.parametrize("accuracy", [None, float("nan")])
def test_a_complete_trial_without_an_accuracy_fails_instead_of_being_told_zero(tmp_path, accuracy):
    driver, study = _driver(tmp_path)
    cand = ash.Candidate.uniform(bits=8, prune=0.0)
    driver.tell(study.ask(), cand, {"state": State.COMPLETE.value, TrialAttr.ACCURACY: accuracy,
                                    TrialAttr.LATENCY_MS: 4.0, TrialAttr.MEETS_BUDGET: True})
    (t,) = study.get_trials()
    assert t.state.name == State.FAIL and t.user_attrs[TrialAttr.ERROR] == Reason.NO_ACCURACY


def test_torchao_patch_warnings_and_uncounted_ops_are_recorded(tmp_path):
    driver, study = _driver(tmp_path)
    cand = ash.Candidate.uniform(bits=8, prune=0.0)
    line = "torchao patch x not installed: its target moved"
    driver.tell(study.ask(), cand, {"state": State.COMPLETE.value, TrialAttr.ACCURACY: 90.0,
                                    TrialAttr.LATENCY_MS: 4.0, TrialAttr.MEETS_BUDGET: True, TrialAttr.MMACS: 1.0,
                                    TrialAttr.PATCH_WARNINGS: [line],
                                    TrialAttr.UNCOUNTED_OPS: {"aten::scaled_dot_product_attention": 2}})
    assert study.user_attrs[StudyAttr.WARNINGS] == [line]
    (t,) = study.get_trials()
    assert t.user_attrs[TrialAttr.UNCOUNTED_OPS] == {"aten::scaled_dot_product_attention": 2}
    df = load(tmp_path, study_name=study.study_name).trials
    assert df.loc[0, "uncounted_ops"] == "aten::scaled_dot_product_attention x2"


def test_the_reachability_check_says_when_it_cannot_give_a_verdict(monkeypatch):
    import autoshrink.compress
    from autoshrink.search import TrialSettings, check_reachable

    def broken(*args, **kwargs):
        raise RuntimeError("torch-pruning could not trace it")

    monkeypatch.setattr(autoshrink.compress, "compress", broken)
    space = ash.SearchSpace.from_dict({"layers": [{"pattern": "*", "bits": [8], "prune": [0.0]}]}, source="s.yaml")
    task = types.SimpleNamespace(model=None, example_input=None)
    lines = check_reachable(task, space, BUDGET, TrialSettings(), latency=False)
    assert lines == ["the budget's reachability was not checked: the space's cheapest configuration could "
                     "not be compressed (RuntimeError: torch-pruning could not trace it)"]


def test_a_failed_budget_edge_probe_is_shown(tmp_path, monkeypatch, capsys):
    import importlib

    from autoshrink.search import TrialSettings

    search_pkg = importlib.import_module("autoshrink.search")  # the package (ash.search is the function)

    monkeypatch.setattr(search_pkg, "budget_edge", lambda *a, **k: {"prune": None, "probes": [], "seconds": 1.0,
                                                                    "error": "probe 0.25: Int8CompileError"})
    study = optuna.create_study(directions=STUDY_DIRECTIONS)
    space = ash.SearchSpace.from_dict({"layers": [{"pattern": "*", "bits": [8], "prune": [0.0, 0.5]}]},
                                      source="s.yaml")
    config = types.SimpleNamespace(time_here=True, settings=TrialSettings(), progress=True, trials=1, solver=False)
    search_pkg._enqueue_baselines(None, space, BUDGET, config, study)
    assert "budget-edge probe failed (probe 0.25: Int8CompileError)" in capsys.readouterr().out
    assert any("budget-edge probe failed" in line for line in study.user_attrs[StudyAttr.WARNINGS])


def test_a_search_in_another_runtime_re_times_and_scores_that_runtimes_artifact(tmp_path, monkeypatch):
    """Not model.pt2 in Inductor under the runtime's name: the re-timing process is asked for the
    runtime (its artifact beside model.pt2), and the test split is scored by the runtime's loader."""
    import autoshrink.export
    import autoshrink.measure.remeasure
    import autoshrink.runtimes

    study = _study(tmp_path, [(95.0, 4.8), (94.0, 4.0)])
    made = {}

    class Recorder(FakeRetimer):
        def __init__(self, artifact, example_input, **kwargs):
            super().__init__({0: 4.7, 1: 4.1})
            made.update(kwargs)

    monkeypatch.setattr(autoshrink.measure.remeasure, "TrialRetimer", Recorder)
    monkeypatch.setattr(autoshrink.export, "load_deployable",
                        lambda path: pytest.fail(f"{path} was opened in Inductor in an onnxruntime search"))
    opened = []

    class FakeRuntime:
        def load(self, folder, *, threads):
            opened.append((str(folder), threads))
            return f"ort:{folder}"

    monkeypatch.setattr(autoshrink.runtimes, "get", lambda name: FakeRuntime() if name == "onnxruntime"
                        else pytest.fail(name))
    scored = []

    def evaluate(model, *, fixed_batch, split):
        scored.append(model)
        return (91.0, 0.5)

    task = types.SimpleNamespace(example_input=None, test_data=object(), evaluate=evaluate)
    finalize(task, study, BUDGET, tmp_path, latency_threads=2, runtime="onnxruntime")
    assert made["runtime"] == "onnxruntime" and made["threads"] == 2
    folders = sorted(str(artifact_path(tmp_path, n).parent) for n in (0, 1))
    assert sorted(f for f, _ in opened) == folders and {t for _, t in opened} == {2}
    assert sorted(scored) == [f"ort:{f}" for f in folders]

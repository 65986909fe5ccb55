"""Transfer between studies (``--warm-start DIR``): refusals, what the sampler is told under a new
budget, and that warm trials neither count nor become results.

The fast tests build the earlier study directly in SQLite, with real search-space params (sampled
from ``tiny_space``) and recorded measurements; one slow test runs two real searches.
"""

from __future__ import annotations

import importlib
import re

import optuna
import pytest
import torch
from conftest import TinyNet  # tests/conftest.py: pytest puts tests/ on sys.path for it
from torch.utils.data import TensorDataset

import autoshrink as ash
from autoshrink.cli import main
from autoshrink.record import STUDY_DIRECTIONS, State, StudyAttr, TrialAttr
from autoshrink.result import trials_frame
from autoshrink.search import SearchError, accounting, make_sampler
from autoshrink.search.warm import check_warm_start, copy_trials, teacher_fingerprint, warm_values

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _trial(attrs: dict, state: str = "COMPLETE"):
    return optuna.trial.create_trial(state=getattr(optuna.trial.TrialState, state),
                                     values=[0.0, 1.0] if state == "COMPLETE" else None, user_attrs=attrs)


def _tuned(acc: float, lat: float, size: float = 0.1) -> dict:
    return {TrialAttr.ACCURACY: acc, TrialAttr.LATENCY_MS: lat, TrialAttr.SIZE_MB: size, TrialAttr.MMACS: 1.0,
            TrialAttr.MEETS_BUDGET: True, TrialAttr.FINETUNE_S: 3.0, TrialAttr.LATENCY_THREADS: 1}


def _rejected(lat: float | None, size: float = 0.1) -> dict:
    a = {TrialAttr.SIZE_MB: size, TrialAttr.MMACS: 1.0, TrialAttr.MEETS_BUDGET: False}
    return a if lat is None else {**a, TrialAttr.LATENCY_MS: lat, TrialAttr.LATENCY_THREADS: 1}


# -- what the sampler is told under the new budget ---------------------------------------------------
def test_values_and_constraints_are_recomputed_for_the_new_budget():
    three, eight = ash.Budget(latency_ms=3.0), ash.Budget(latency_ms=8.0)
    tuned = _trial(_tuned(91.0, 4.0))  # fine-tuned under a 5 ms budget
    assert warm_values(tuned, eight) == ([91.0, 8.0], {"latency_ms": -0.5}, True)  # raised to the budget
    values, constraints, feasible = warm_values(tuned, three)  # now too slow: infeasible, accuracy 0
    assert (values, feasible) == ([0.0, 4.0], False) and constraints["latency_ms"] == pytest.approx(1 / 3)
    rejected = _trial(_rejected(6.0))  # rejected by the 5 ms gate, never fine-tuned
    assert warm_values(rejected, three) == ([0.0, 6.0], {"latency_ms": 1.0}, False)
    # meets 8 ms but has no accuracy: neither feasible (it would need one) nor infeasible (it is not)
    assert warm_values(rejected, eight) is None
    # rejected on size before its latency was timed: over a size limit it is infeasible ...
    big = _trial(_rejected(None, size=2.0))
    assert warm_values(big, ash.Budget(latency_ms=3.0, size_mb=1.0)) == (
        [0.0, 1e9], {"latency_ms": 0.0, "size_mb": 1.0}, False)
    # ... and under a latency limit alone it cannot be judged
    assert warm_values(big, three) is None
    # a fine-tuned trial not timed cannot be judged against a latency limit either
    assert warm_values(_trial({k: v for k, v in _tuned(90.0, 1.0).items() if k != TrialAttr.LATENCY_MS}),
                       three) is None
    assert warm_values(_trial({TrialAttr.ERROR: "boom"}, state="FAIL"), eight) is None


# -- studies in SQLite -------------------------------------------------------------------------------
def _source(folder, space, *, teacher: str | None = "t" * 16, runtime: str = "inductor", n: int = 12,
            fingerprint: str | None = None):
    """A finished earlier search under 5 ms: candidates sampled from ``space``; those with
    ``bits.stage1 == 8`` fine-tuned within the budget (accurate), the others rejected at 7 ms."""
    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{folder / 'study.db'}", study_name="autoshrink",
                                directions=STUDY_DIRECTIONS, sampler=optuna.samplers.RandomSampler(seed=1))
    study.set_user_attr(StudyAttr.SPACE_FINGERPRINT, fingerprint or space.fingerprint())
    study.set_user_attr(StudyAttr.SPACE_SOURCE, "old.yaml")
    study.set_user_attr(StudyAttr.BUDGET, {"latency_ms": 5.0})
    study.set_user_attr(StudyAttr.RUNTIME, runtime)
    if teacher is not None:
        study.set_user_attr(StudyAttr.TEACHER_FINGERPRINT, teacher)
    for i in range(n):
        study.enqueue_trial({"bits.stage1": (8, 4)[i % 2]})  # the rest at random
        t = study.ask()
        space.sample(t)
        good = t.params["bits.stage1"] == 8
        attrs = _tuned(90.0 + t.params["prune.stage1"], 4.0) if good else _rejected(7.0)
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        t.set_constraint("latency_ms", (attrs[TrialAttr.LATENCY_MS] - 5.0) / 5.0)
        study.tell(t, [attrs.get(TrialAttr.ACCURACY, 0.0), max(attrs[TrialAttr.LATENCY_MS], 5.0)])
    failed = study.ask()
    failed.set_user_attr(TrialAttr.ERROR, "boom")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    return folder, study


def _new_study(space, seed: int = 0):
    return optuna.create_study(directions=STUDY_DIRECTIONS, sampler=make_sampler("tpe", seed, space))


def test_copied_trials_carry_the_new_budget_and_do_not_count(tmp_path, tiny_space):
    folder, src = _source(tmp_path / "run5", tiny_space)
    source = check_warm_start(folder, space=tiny_space, teacher="t" * 16)
    good = [t for t in src.trials if t.state.name == "COMPLETE" and t.params["bits.stage1"] == 8]
    bad = [t for t in src.trials if t.state.name == "COMPLETE" and t.params["bits.stage1"] == 4]
    assert good and bad

    study = _new_study(tiny_space)
    summary = copy_trials(source, study, ash.Budget(latency_ms=3.0))  # tighter: the 4 ms ones miss it now
    assert summary == {"from": str(folder), "copied": len(good) + len(bad), "infeasible": len(good) + len(bad),
                       "left_out": 0}
    assert study.user_attrs[StudyAttr.WARM_START] == summary
    warm = study.get_trials()
    assert [t.number for t in warm] == list(range(len(good) + len(bad)))
    by_origin = {t.user_attrs[TrialAttr.WARM_FROM]["trial"]: t for t in warm}
    for old in good:
        new = by_origin[old.number]
        assert new.params == old.params and new.distributions == old.distributions
        assert new.values == [0.0, 4.0] and new.constraints["latency_ms"] == pytest.approx(1 / 3)
        assert new.user_attrs[TrialAttr.ACCURACY] == old.user_attrs[TrialAttr.ACCURACY]  # the record is kept
        assert new.user_attrs[TrialAttr.WARM_FROM] == {"run": str(folder), "trial": old.number}

    # not counted towards the new search's trials, and not rows of its results
    assert accounting.committed(study.get_trials()) == 0
    assert trials_frame(study).empty
    t = study.ask()
    tiny_space.sample(t)
    study.tell(t, [80.0, 3.0])
    assert accounting.finished(study.get_trials()) == 1
    assert list(trials_frame(study)["number"]) == [t.number]
    assert copy_trials(source, study, ash.Budget(latency_ms=3.0)) == summary  # once only
    assert len(study.get_trials()) == len(warm) + 1


def test_a_looser_budget_keeps_the_tuned_and_leaves_out_the_never_tuned(tmp_path, tiny_space):
    folder, src = _source(tmp_path / "run5", tiny_space)
    study = _new_study(tiny_space)
    summary = copy_trials(check_warm_start(folder, space=tiny_space), study, ash.Budget(latency_ms=8.0))
    good = [t for t in src.trials if t.state.name == "COMPLETE" and t.params["bits.stage1"] == 8]
    # the 7 ms rejections meet 8 ms but were never fine-tuned: left out, not told as infeasible
    assert summary["copied"] == len(good) and summary["infeasible"] == 0
    assert summary["left_out"] == sum(1 for t in src.trials if t.state.name == "COMPLETE") - len(good)
    for t in study.get_trials():
        assert t.values[1] == 8.0 and t.values[0] >= 90.0 and t.constraints["latency_ms"] == -0.5


def test_the_sampler_learns_from_the_warm_trials(tmp_path, tiny_space):
    """With the earlier trials, TPE leaves its random start-up at once and proposes where the
    earlier study was accurate within the budget (``bits.stage1 == 8``); cold, with the same seed,
    it samples at random."""
    folder, _ = _source(tmp_path / "run5", tiny_space, n=16)
    source = check_warm_start(folder, space=tiny_space)

    def proposals(study, n: int = 8) -> list[dict]:
        out = []
        for _ in range(n):
            t = study.ask()
            tiny_space.sample(t)
            out.append(t.params)
            study.tell(t, state=optuna.trial.TrialState.FAIL)  # the sampler learns nothing new from it
        return out

    warm = _new_study(tiny_space)
    copy_trials(source, warm, ash.Budget(latency_ms=5.0))
    seen = warm.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(seen) == 16 and all(TrialAttr.WARM_FROM in t.user_attrs for t in seen)
    warm_picks = proposals(warm)
    cold_picks = proposals(_new_study(tiny_space))
    assert sum(p["bits.stage1"] == 8 for p in warm_picks) >= 7, warm_picks
    assert warm_picks != cold_picks


# -- refusals ----------------------------------------------------------------------------------------
def test_refusals_name_the_source_and_the_fix(tmp_path, tiny_space):
    other = ash.SearchSpace.from_dict({"name": "other", "layers": [{"pattern": "fc", "bits": [8, 32]}]},
                                      source="other.yaml")
    folder, _ = _source(tmp_path / "run5", tiny_space)
    cases = [
        (dict(warm_start=tmp_path / "nope", space=tiny_space),
         r"--warm-start: '.*nope' holds no search \(no study\.db\)"),
        (dict(warm_start=folder, space=other),
         r"--warm-start: the study in '.*run5' was made with a different search space \(old\.yaml, now "
         r"other\.yaml\); use the same space, or start without --warm-start"),
        (dict(warm_start=folder, space=tiny_space, teacher="0" * 16),
         r"the study in '.*run5' was made with another teacher \(weights t{16}, now 0{16}\); warm-start from "
         r"a run of the same model and weights"),
        (dict(warm_start=folder, space=tiny_space, runtime="openvino"),
         r"was timed in inductor, not openvino: its latencies do not transfer; use --runtime inductor"),
        (dict(warm_start=folder, space=tiny_space, latency_threads=4),
         r"the study in '.*run5' timed latency with 1 thread\(s\), now 4: its latencies do not transfer; use "
         r"--latency-threads 1"),
        (dict(warm_start=folder, space=tiny_space, resume=True), r"--warm-start and --resume: pick one"),
        (dict(warm_start=_source(tmp_path / "old", tiny_space, teacher=None)[0], space=tiny_space, teacher="t" * 16),
         r"the study in '.*old' predates warm-start \(it records no teacher fingerprint\)"),
        (dict(warm_start=_source(tmp_path / "empty", tiny_space, n=0)[0], space=tiny_space),
         r"the study in '.*empty' has no finished trial to start from"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(SearchError) as info:
            check_warm_start(**kwargs)
        assert re.search(pattern, str(info.value)) and "\n" not in str(info.value), (kwargs, str(info.value))
    assert check_warm_start(folder, space=tiny_space, teacher="t" * 16, latency_threads=1).study_name == "autoshrink"


def _task(seed: int):
    torch.manual_seed(seed)
    data = TensorDataset(torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,)))
    return ash.Task(model=TinyNet().eval(), train_data=data, val_data=data, example_input=torch.randn(1, 1, 16, 16),
                    name="tiny", teacher_accuracy=10.0)


def test_teacher_fingerprint_tells_teachers_apart():
    a, b = _task(0).model, _task(1).model
    assert teacher_fingerprint(a) == teacher_fingerprint(a) and teacher_fingerprint(a) != teacher_fingerprint(b)


def test_search_refuses_another_teacher_before_any_training(tmp_path, tiny_space, monkeypatch):
    folder, _ = _source(tmp_path / "run5", tiny_space)
    task = _task(0)
    package = importlib.import_module("autoshrink.search")  # (autoshrink.search is also the function)
    monkeypatch.setattr(package, "check_exportable", lambda *_: pytest.fail("got past the checks"))
    with pytest.raises(SearchError, match=r"was made with another teacher \(weights t{16}, now "
                       + teacher_fingerprint(task.model)):
        ash.search(task, tiny_space, ash.Budget(latency_ms=3.0), trials=1, out=tmp_path / "new", warm_start=folder,
                   progress=False)


TINY_SPACE = """\
name: tiny
layers:
  - {name: stage1, pattern: "layer1.*", bits: [4, 8], prune: [0.0, 0.5]}
finetune: {steps: 10, lr: 0.01, batch_size: 32}
"""


@pytest.mark.parametrize("case", ["no-study", "other-space"])
def test_cli_refusal_is_one_line(case, tmp_path, monkeypatch, capsys, tiny_space):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_SPACE)
    source = tmp_path / "nope" if case == "no-study" else _source(tmp_path / "run5", tiny_space, fingerprint="0000")[0]
    capsys.readouterr()
    code = main(["search", "--budget-ms", "3", "--space", "tiny.yaml", "--out", str(tmp_path / "new"),
                 "--warm-start", str(source)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    want = (r"--warm-start: '.*nope' holds no search \(no study\.db\); give the run folder of an earlier search"
            if case == "no-study" else
            r"--warm-start: the study in '.*run5' was made with a different search space \(old\.yaml, now "
            r"tiny\.yaml\)")
    assert re.search(want, lines[0]), lines[0]


# -- end to end --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_warm_started_search_under_another_budget(finished_search, second_search):
    # the source: the suite's shared finished search (50 ms and 0.0125 MB; read, never written);
    # the second: warm-started from it under 40 ms (tests/conftest.py; its time limit lets one trial run)
    first, source, task = finished_search
    assert first.meta[StudyAttr.TEACHER_FINGERPRINT] == teacher_fingerprint(task.model)
    done = first.trials[first.trials["state"] == State.COMPLETE]
    assert len(done) >= 1
    second, out, _ = second_search
    summary = second.meta[StudyAttr.WARM_START]
    assert summary["from"] == str(source) and summary["copied"] + summary["left_out"] == len(done)
    # one trial of its own ran; the warm ones are not among its results
    own = second.trials[second.trials["state"] != State.WAITING]
    assert len(own) == 1 and own["number"].iloc[0] == summary["copied"]
    study = optuna.load_study(study_name="autoshrink", storage=f"sqlite:///{out / 'study.db'}")
    warm = [t for t in study.trials if TrialAttr.WARM_FROM in t.user_attrs]
    assert len(warm) == summary["copied"] and all(t.user_attrs[TrialAttr.WARM_FROM]["run"] == str(source)
                                                   for t in warm)

"""The latency predictor's calibration: features of a candidate's graph, a non-negative fit on
recorded whole-model timings, held-out scores, and screening with it.

``data/recorded_timings.json`` holds real timings (see its ``note`` and
``data/make_recorded_timings.py``): the calibration must beat the raw per-layer sum on them, held out.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from autoshrink import Budget, Candidate
from autoshrink.measure import calibration as cal
from autoshrink.measure.calibration import Calibration, ExampleStore, Structure, feature_vector, raw_sum, structure
from autoshrink.measure.predictor import LatencyPredictor, machine_key, table_key
from autoshrink.record import STUDY_DIRECTIONS, Reason, State, StudyAttr, TrialAttr

DATA = Path(__file__).with_name("data") / "recorded_timings.json"


def _recorded():
    data = json.loads(DATA.read_text())
    table = data["table"]
    rows, measured, raw = [], [], []
    for ex in data["examples"]:
        s = Structure.from_dict(ex["structure"])
        rows.append(feature_vector(s, table))
        raw.append(raw_sum(s, table))
        measured.append(ex["measured_ms"])
    return rows, measured, raw


def test_calibration_beats_the_raw_sum_on_recorded_timings():
    rows, measured, raw = _recorded()
    assert len(measured) >= 16 and all(r is not None for r in rows)  # the fixture names every entry it needs
    scores = cal.held_out(rows, measured, raw, folds=5)
    assert scores["median_error"] < scores["raw_median_error"], scores
    assert scores["tau"] > scores["raw_tau"], scores
    fitted = Calibration.from_examples(rows, measured, raw)
    assert all(c >= 0 for c in fitted.coef) and fitted.n == len(measured)


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, 1, 1)
        self.b = nn.Conv2d(4, 4, 3, 1, 1)
        self.c = nn.Conv2d(4, 4, 3, 1, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.relu(self.c(torch.relu(self.b(y))) + y)  # a residual add
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.mark.parametrize(("bits", "transitions"), [
    ({}, 0),  # all fp32: no quantize anywhere
    ({"a": 8, "b": 8, "c": 8, "fc": 8}, 2),  # quantize the input, dequantize the output
    ({"a": 8, "c": 8}, 4),  # int8 a -> fp32 b -> int8 c -> fp32 fc
    ({"b": 4}, 2),  # 4-bit weights run int8 kernels
])
def test_structure_counts_transitions_in_execution_order(bits, transitions):
    s = structure(_Mixed(), bits, torch.randn(3, 1, 6, 6), machine="m")
    assert s.transitions == transitions
    assert s.layers[0] == table_key(nn.Conv2d(1, 4, 3, 1, 1), (1, 1, 6, 6), bits.get("a", 32))
    assert len(s.layers) == 4 and s.machine == "m"
    # 3 ReLUs and the add over 4x6x6, the pooling's 4 outputs
    assert s.ops == 5 and s.op_elements == 4 * 144 + 4


def test_screen_rule():
    assert cal.screen(1.31, 1.0, 0.1) and not cal.screen(1.29, 1.0, 0.1)
    assert not cal.screen(1.0, 1.0, 0.0) and cal.screen(1.01, 1.0, 0.0)
    with pytest.raises(ValueError, match="positive budget"):
        cal.screen(1.0, 0.0, 0.1)


def _cal(n=20, tau=0.95, err=0.05):
    return Calibration(coef=[1.0] * len(cal.FEATURES), n=n, tau=tau, median_error=err)


def test_screening_is_on_by_default_only_where_the_goal_is_met():
    from autoshrink.search.screening import decide

    assert decide(None, _cal(), budget_ms=1.0).on
    off = decide(None, _cal(tau=0.8), budget_ms=1.0)
    assert not off.on and "misses its goal" in off.why
    assert not decide(None, _cal(err=0.2), budget_ms=1.0).on
    assert not decide(None, _cal(n=5), budget_ms=1.0).on  # too few examples: not usable
    assert decide(True, _cal(tau=0.5), budget_ms=1.0).on  # asked for: on wherever it is calibrated
    assert not decide(True, None, budget_ms=1.0).on
    assert not decide(False, _cal(), budget_ms=1.0).on
    assert "no latency budget" in decide(None, _cal(), budget_ms=None).why
    assert not decide(None, _cal(), budget_ms=1.0, timed_elsewhere=True).on


def _fake_timer(monkeypatch):
    def fake(self, model, x):
        return 0.05 + x.numel() / 1e4

    monkeypatch.setattr(LatencyPredictor, "_time", fake)


def _examples(pred, n=12):
    """Candidates of _Mixed with their 'measured' latency: a graph costing what the table misses."""
    out = []
    for i in range(n):
        bits = {name: 8 for j, name in enumerate(("a", "b", "c", "fc")) if (i >> j) & 1}
        s = pred.structure(_Mixed(), bits, torch.randn(1, 1, 6 + i % 3, 6 + i % 3))
        raw = pred.predict_structure(s, calibrated=False)
        out.append((s, 0.7 * raw + 0.03 * s.transitions + 0.002 * s.op_elements / 1e3))
    return out


def test_record_calibrate_and_predict_calibrated(tmp_path, monkeypatch):
    _fake_timer(monkeypatch)
    pred = LatencyPredictor(tmp_path / "box.json")
    examples = _examples(pred)
    for s, ms in examples[:7]:
        pred.record(s, ms)
    assert pred.calibrate().n == 7 and not pred.calibration.usable  # stored, but the raw sum still predicts
    s0, ms0 = examples[0]
    assert pred.predict_structure(s0) == pytest.approx(pred.predict_structure(s0, calibrated=False))
    for s, ms in examples[7:]:
        pred.record(s.to_dict(), ms)
    fitted = pred.calibrate()
    assert fitted.n == 12 and fitted.usable and fitted.median_error < 0.01 and fitted.tau > 0.9
    assert fitted.raw_median_error > 0.1  # the raw sum is off by what the table misses
    again = LatencyPredictor(tmp_path / "box.json")  # another process: the calibration is beside the table
    assert again.calibration == fitted
    x = torch.randn(1, 1, 7, 7)
    truth = next(ms for s, ms in examples if s.layers == again.structure(_Mixed(), {"a": 8}, x).layers)
    assert again.predict_pruned(_Mixed(), {"a": 8}, x) == pytest.approx(truth, rel=0.01)
    with pytest.raises(ValueError, match="cannot calibrate"):
        pred.record(Structure([], 0, 0, 0, machine="elsewhere"), 1.0)


def test_calibrate_times_missing_entries_only_when_asked(tmp_path, monkeypatch):
    _fake_timer(monkeypatch)
    first = LatencyPredictor(tmp_path / "one" / "box.json")
    examples = _examples(first, 4)
    second = LatencyPredictor(tmp_path / "two" / "box.json")  # the same machine's table, fresh: entries missing
    for s, ms in examples:
        second.record(s, ms)
    assert second.calibrate() is None and "call" not in second.table
    assert second.calibrate(measure_missing=True).n == 4
    assert set(second.table) == set(first.table)


def test_example_store_skips_a_torn_line(tmp_path):
    store = ExampleStore(tmp_path / "x.jsonl")
    store.add(Structure(["k"], 1, 2, 3, "m"), 1.5)
    with store.path.open("a") as f:
        f.write('{"structure": {"layers": [')  # a writer killed mid-line
    store.add(Structure(["k"], 1, 2, 3, "m"), 2.5)
    assert [ms for _, ms in store.load()] == [1.5]  # the torn line swallowed the next one's start
    with pytest.raises(ValueError, match="positive number"):
        store.add(Structure([], 0, 0, 0), float("nan"))


# -- the driver ---------------------------------------------------------------------------------
def _driver(tmp_path, budget_ms=1.0):
    import optuna

    from autoshrink.search.config import DriverConfig
    from autoshrink.search.driver import Driver

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=STUDY_DIRECTIONS)
    return Driver(task=None, space=None, study=study, config=DriverConfig(budget=Budget(latency_ms=budget_ms),
                                                                         out=tmp_path / "run"))


def _never_compile(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("a screened candidate was compiled")

    import autoshrink.compress.quantize as quantize
    import autoshrink.measure.latency as latency

    for mod, name in ((quantize, "compile_cpu"), (quantize, "compile_checked"), (quantize, "lower"),
                      (latency, "measure_latency")):
        monkeypatch.setattr(mod, name, boom)


def test_driver_screens_a_far_candidate_without_compiling_it(tmp_path, monkeypatch):
    from autoshrink.search import accounting
    from autoshrink.search.screening import Screener
    from tests.conftest import TinyNet

    _fake_timer(monkeypatch)
    pred = LatencyPredictor(tmp_path / "box.json")
    task = SimpleNamespace(model=TinyNet().eval(), example_input=torch.randn(1, 1, 8, 8))
    cand = Candidate.uniform(bits=8)
    comp_s = pred.structure(task.model, {n: 8 for n, m in task.model.named_modules()
                                         if isinstance(m, (nn.Conv2d, nn.Linear))}, task.example_input)
    raw = pred.predict_structure(comp_s, calibrated=False)  # fills the table (the fake timer)
    pred.calibration = Calibration(coef=[1.0, 1.0, 1.0, 0, 0, 0, 0], n=20, tau=0.95, median_error=0.05)
    _never_compile(monkeypatch)

    driver = _driver(tmp_path, budget_ms=raw / 2)  # predicted twice the budget: far over it
    screener = Screener(pred, task, driver.budget.latency_ms)
    trial = driver.study.ask()
    assert driver.screen(trial, cand, screener)
    t = driver.study.trials[0]
    assert State.of(t) is State.COMPLETE and t.user_attrs[TrialAttr.ERROR] == Reason.PREDICTED_OVER_BUDGET
    assert t.user_attrs[TrialAttr.PREDICTED_LATENCY_MS] == pytest.approx(raw)
    assert TrialAttr.LATENCY_MS not in t.user_attrs  # never measured
    assert t.user_attrs[TrialAttr.MEETS_BUDGET] is False and accounting.screened(t)
    over = [v for k, v in t.system_attrs.items() if k.endswith(TrialAttr.LATENCY_MS)]
    assert over == [pytest.approx(1.0)] and t.values[1] == pytest.approx(raw)  # the sampler hears "100 % over"
    assert driver.study.user_attrs[StudyAttr.COMPILATIONS_SAVED] == 1

    near = _driver(tmp_path, budget_ms=raw / 1.1)  # over the budget, but within 3 errors: the gate decides
    assert not near.screen(near.study.ask(), cand, Screener(pred, task, near.budget.latency_ms))
    assert near.study.trials[0].state.name == "RUNNING"


def test_driver_records_measured_candidates_and_why_screening_is_off(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSHRINK_CACHE", str(tmp_path / "cache"))
    driver = _driver(tmp_path)
    assert driver.start_screening() is None
    said = driver.study.user_attrs[StudyAttr.PREDICTOR_SCREENING]
    assert said["on"] is False and "no calibration" in said["why"] and said["machine"] == machine_key(1)
    assert driver.study.user_attrs[StudyAttr.COMPILATIONS_SAVED] == 0

    s = Structure(["conv:1:4:3x3:s1:p1:g1:6x6:q1"], 2, 1, 10, machine=machine_key(1))
    trial = driver.study.ask()
    driver.tell(trial, Candidate.uniform(bits=8), {"state": "COMPLETE", TrialAttr.LATENCY_MS: 2.0,
                                                   TrialAttr.MEETS_BUDGET: False,
                                                   TrialAttr.LATENCY_STRUCTURE: s.to_dict()})
    recorded = LatencyPredictor.for_machine().examples.load()
    assert recorded == [(s, 2.0)]
    assert TrialAttr.LATENCY_STRUCTURE not in driver.study.trials[0].user_attrs  # a calibration example, not a record


@pytest.mark.slow
@pytest.mark.heavy  # the driver's screening runs always above (test_driver_screens_a_far_candidate_...)
@pytest.mark.usefixtures("shared_ray", "no_finalize")  # tests/conftest.py
def test_a_search_screens_what_the_predictor_puts_far_over_budget(tiny_task, tiny_space, tmp_path, monkeypatch):
    """A real search (Ray, compiles, fine-tunes) with a calibration that meets the goal and a prediction
    rigged to put every sampled candidate with an fp32 stem at 1 s: those are told as screened, never sent
    to a worker (no measured latency, no measuring time), and the study counts the compilations saved."""
    import autoshrink as ash

    monkeypatch.setenv("AUTOSHRINK_CACHE", str(tmp_path / "cache"))  # no examples of earlier tests
    pred = LatencyPredictor.for_machine()
    pred.calibration_path.parent.mkdir(parents=True, exist_ok=True)
    pred.calibration_path.write_text(json.dumps(_cal().to_dict()))

    def rigged(self, s, *, measure_missing=True, calibrated=True):
        return 1e3 if s.layers[0].endswith(":q0") else 1.0

    monkeypatch.setattr(LatencyPredictor, "predict_structure", rigged)
    out = tmp_path / "run"
    ash.search(tiny_task, tiny_space, ash.Budget(latency_ms=50.0), trials=1, workers=1, out=out, seed=1,
               sampler="random", progress=False, latency_runs=5, early_stopping=False, enqueue_baselines=False)
    study = ash.load(out)._study
    said = study.user_attrs[StudyAttr.PREDICTOR_SCREENING]
    assert said["on"] is True and "meets its goal" in said["why"]
    trials = study.get_trials(deepcopy=False)
    screened = [t for t in trials if t.user_attrs.get(TrialAttr.ERROR) == Reason.PREDICTED_OVER_BUDGET]
    assert screened and study.user_attrs[StudyAttr.COMPILATIONS_SAVED] == len(screened)
    for t in screened:
        assert t.user_attrs[TrialAttr.PREDICTED_LATENCY_MS] == 1e3
        assert TrialAttr.LATENCY_MS not in t.user_attrs and TrialAttr.MEASURE_S not in t.user_attrs
    tuned = [t for t in trials if t.user_attrs.get(TrialAttr.FINETUNE_S)]
    assert len(tuned) == 1 and all(t.user_attrs.get(TrialAttr.LATENCY_MS) for t in tuned)  # measured for real
    # and every measured candidate became a calibration example of this machine
    assert len(pred.examples.load()) == sum(1 for t in trials if t.user_attrs.get(TrialAttr.LATENCY_MS))


def test_search_refuses_a_non_boolean_predictor_screening():
    import autoshrink as ash
    from autoshrink.errors import InputError

    with pytest.raises(InputError, match="predictor_screening must be True, False or None"):
        ash.search(None, None, predictor_screening="yes")

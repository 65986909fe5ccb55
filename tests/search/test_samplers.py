"""Samplers and multi-fidelity: the driver's ask → ``space.sample`` → tell path with fake results
(no training), one conformance case per sampler; the grid; the early-stopping rule; pruned trials."""

from __future__ import annotations

import itertools

import optuna
import pytest
import torch

import autoshrink as ash
from autoshrink import Budget, Candidate, SearchSpace, SpaceError
from autoshrink.record import STUDY_DIRECTIONS, State, TrialAttr
from autoshrink.search import SAMPLERS, Driver, DriverConfig, SearchError, baselines, make_sampler, space_defaults
from autoshrink.search.rungs import Rungs
from autoshrink.trial import TrialContext, evaluate

BUDGET = Budget(latency_ms=4.0)


def _fake_metrics(cand: Candidate) -> dict:
    """A deterministic stand-in for a trial: fewer bits and more pruning are faster and less
    accurate; over-budget candidates are measured but not fine-tuned."""
    layers = ("conv1", "layer1.0.conv1", "layer2.0.conv1", "fc")
    bits = sum(cand.bits_for(n) for n in layers) / len(layers)
    prune = sum(cand.prune_for(n) for n in layers) / len(layers)
    latency = 1.0 + bits / 8 * (1 - prune) + cand.kd_temperature / 10
    meets = latency <= BUDGET.latency_ms
    accuracy = 95 - 10 * prune - (32 - bits) / 8 + cand.kd_alpha if meets else None
    return {"state": State.COMPLETE, "accuracy": accuracy, "latency_ms": latency, "size_mb": 0.1,
            "mmacs": 1.0, "meets_budget": meets, "finetune_s": 1.0 if meets else 0.0}


def _drive(sampler: str, seed: int, space: SearchSpace, n: int, out) -> list[dict]:
    """What ``search`` does, minus Ray and training: enqueue the baselines, then ask, sample,
    tell ``n`` times through the driver's own ``tell``."""
    study = optuna.create_study(directions=STUDY_DIRECTIONS, sampler=make_sampler(sampler, seed, space))
    for cand in baselines(space, space_defaults(space)):
        study.enqueue_trial(space.candidate_params(cand), skip_if_exists=True)
    driver = Driver(task=None, space=space, study=study, config=DriverConfig(budget=BUDGET, out=out))
    for _ in range(n):
        trial = study.ask()
        cand = space.sample(trial)
        driver.tell(trial, cand, _fake_metrics(cand))
    return [t.params for t in study.trials]


class _MiniNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, 2, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, 2, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def mini_task():
    """An untrained small CNN on random data: enough for evaluate's mechanics, no training."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,)))
    return ash.Task(model=_MiniNet(), train_data=data, val_data=data, example_input=torch.randn(1, 1, 32, 32),
                    name="mini")


@pytest.fixture(scope="module")
def finite_space():
    """Small and fully discrete (choices and stepped ranges, int and float): every sampler can
    run on it, the grid sampler included (2 · 2 · 3 · 2 = 24 points)."""
    return SearchSpace.from_dict(
        {
            "layers": [
                {"name": "stem", "pattern": "conv1", "bits": [8, 32]},
                {"name": "body", "pattern": "layer*", "bits": [4, 8], "prune": {"low": 0.0, "high": 0.5, "step": 0.25}},
            ],
            "distill": {"temperature": [2.0, 4.0], "alpha": 0.7},
            "finetune": {"steps": 60, "lr": 0.01, "batch_size": 32},
        },
        source="finite.yaml",
    )


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_is_seeded_and_starts_with_the_baselines(sampler, finite_space, tmp_path):
    first = _drive(sampler, 7, finite_space, 12, tmp_path / "a")
    again = _drive(sampler, 7, finite_space, 12, tmp_path / "b")
    assert first == again
    expected = [finite_space.candidate_params(c) for c in baselines(finite_space, space_defaults(finite_space))]
    assert first[:3] == expected
    assert first[0]["bits.body"] == 8 and first[0]["prune.body"] == 0.0
    assert [p["prune.body"] for p in first[:3]] == [0.0, 0.25, 0.5]
    other = _drive(sampler, 8, finite_space, 12, tmp_path / "c")
    assert other[:3] == expected and other[3:] != first[3:]  # the seed drives everything after


def test_grid_covers_the_grid_once(finite_space, tmp_path):
    grid = finite_space.grid()
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    params = _drive("grid", 0, finite_space, len(points) + 3, tmp_path)
    explored = params[3:]  # after the three baselines
    assert sorted(map(repr, explored)) == sorted(map(repr, points))


def test_grid_values_match_what_sampling_suggests(finite_space):
    assert finite_space.grid() == {
        "bits.stem": [8, 32], "bits.body": [4, 8], "prune.body": [0.0, 0.25, 0.5], "kd_temperature": [2.0, 4.0],
    }
    stepped = SearchSpace.from_dict({"finetune": {"steps": {"low": 100, "high": 300, "step": 100}}})
    assert stepped.grid() == {"finetune_steps": [100, 200, 300]}
    assert all(isinstance(v, int) for v in stepped.grid()["finetune_steps"])


def test_grid_refuses_a_continuous_knob(finite_space):
    message = r"finite\.yaml: distill\.alpha: \{low: 0\.3, high: 0\.9\} is a continuous range.*`step`"
    with pytest.raises(SpaceError, match=message):
        SearchSpace.from_dict(
            {**finite_space.to_dict(), "distill": {"temperature": 4.0, "alpha": {"low": 0.3, "high": 0.9}}},
            source="finite.yaml",
        ).grid()
    with pytest.raises(SpaceError, match=r"default\.yaml: distill\.temperature: .* continuous range"):
        make_sampler("grid", 0, SearchSpace.default())


def test_unknown_sampler_names_the_choices(finite_space):
    message = r"unknown sampler 'cmaes'; choose one of \['tpe', 'nsga2', 'random', 'grid'\]"
    with pytest.raises(SearchError, match=message):
        make_sampler("cmaes", 0, finite_space)


def test_cli_accepts_every_sampler():
    from autoshrink.cli import _parser

    for name in SAMPLERS:
        assert _parser().parse_args(["search", "--budget-ms", "5", "--sampler", name]).sampler == name


# -- multi-fidelity: the early-stopping rule --------------------------------------------------------


def test_rungs_stop_a_clearly_dominated_trial():
    r = Rungs(margin=3.0)
    assert r.report(0, 40, 90.0, 2.0) is False  # first at this rung: no rival yet
    assert r.report(1, 40, 86.0, 2.5) is True  # 4 points worse and slower
    assert r.report(2, 40, 87.5, 2.0) is False  # only 2.5 points worse: within the margin
    assert r.report(3, 40, 86.0, 2.0) is True  # 4 points worse at equal latency


def test_rungs_never_stop_a_faster_trial_for_being_less_accurate():
    r = Rungs(margin=3.0)
    r.report(0, 40, 95.0, 3.0)
    assert r.report(1, 40, 70.0, 1.0) is False  # far less accurate, but faster: may be on the front


def test_rungs_compare_only_the_same_step_of_the_same_schedule():
    r = Rungs(margin=3.0)
    r.report(0, 40, 95.0, 1.0, schedule=120)
    assert r.report(1, 80, 80.0, 2.0, schedule=120) is False  # another step
    assert r.report(2, 40, 80.0, 2.0, schedule=240) is False  # same step, longer fine-tune
    assert r.report(3, 40, 80.0, 2.0, schedule=120) is True


def test_rungs_treat_a_one_sided_unknown_latency_as_not_dominating():
    r = Rungs(margin=3.0)
    r.report(0, 40, 95.0, None)
    assert r.report(1, 40, 80.0, 2.0) is False
    assert r.report(2, 40, 80.0, None) is True  # both unknown: accuracy alone decides


def test_rungs_min_peers_and_resume_seed():
    r = Rungs(margin=3.0, min_peers=2)
    r.report(0, 40, 95.0, 1.0)
    assert r.report(1, 40, 80.0, 2.0) is False  # one rival is not enough
    assert r.report(2, 40, 80.0, 2.0) is True
    resumed = Rungs(margin=3.0)
    resumed.seed({0: [(40, 95.0, 1.0, 120)], 1: [(40, 93.0, 1.0)]})
    assert resumed.report(5, 40, 90.0, 1.5, schedule=120) is True
    assert resumed.report(6, 40, 89.0, 1.5) is True  # rows without a schedule: the unkeyed rung


def test_a_stopped_trial_is_pruned_with_its_history(tmp_path, finite_space):
    study = optuna.create_study(directions=STUDY_DIRECTIONS)
    driver = Driver(task=None, space=finite_space, study=study,
                    config=DriverConfig(budget=BUDGET, out=tmp_path, early_stopping=True))
    trial = study.ask()
    cand = finite_space.sample(trial)
    driver.tell(trial, cand, {"state": State.PRUNED, "latency_ms": 2.0, "meets_budget": True,
                               "finetune_s": 3.0, "history": [(40, 81.0), (80, 84.5)]})
    frozen = study.trials[0]
    assert State.of(frozen) is State.PRUNED
    assert [tuple(row) for row in frozen.user_attrs[TrialAttr.HISTORY]] == [(40, 81.0), (80, 84.5)]
    from autoshrink.result import trials_frame

    assert trials_frame(study)["state"].tolist() == [State.PRUNED]


def test_evaluate_keeps_the_history_of_a_stopped_fine_tune_and_uses_the_given_meter(mini_task):
    from autoshrink.compress.distill import StopTrial
    from autoshrink.measure.latency import Latency

    seen = []

    def report(step, accuracy):
        if step >= 4:
            raise StopTrial("dominated")

    def measure(lowered, x, runs, threads):
        seen.append((type(lowered), tuple(x.shape), runs, threads))
        return Latency(1.5, 1.25, 1.75, runs, threads)

    cand = Candidate.uniform(bits=8, prune=0.25, steps=20, batch_size=16)
    ctx = TrialContext(latency_runs=7, report=report, eval_every=2, measure=measure)
    result = evaluate(mini_task, cand, Budget(latency_ms=2.0), ctx)
    assert result.state == State.PRUNED
    assert [s for s, _ in result.history] == [2, 4]
    assert all(0 <= a <= 100 for _, a in result.history)
    assert result.latency_ms == 1.5 and result.latency_iqr_ms == 0.5
    assert len(seen) == 1 and issubclass(seen[0][0], torch.nn.Module) and seen[0][2:] == (7, 1)
    assert result.finetune_s > 0 and result.accuracy is None


def test_search_caps_a_grid_at_its_size(mini_task, tmp_path, monkeypatch):
    """A grid search asks for no more trials than grid points plus baselines."""
    seen = {}

    def fake_run(self, total, propose=None):
        seen["total"] = total
        raise KeyboardInterrupt

    monkeypatch.setattr(Driver, "run", fake_run)
    monkeypatch.setattr(Driver, "record_meta", lambda self, **kw: None)
    space = SearchSpace.from_dict({"layers": [{"pattern": "conv1", "bits": [8, 32]}]})
    with pytest.raises(KeyboardInterrupt):
        ash.search(mini_task, space, BUDGET, trials=50, workers=1, out=tmp_path, sampler="grid", progress=False)
    assert seen["total"] == 2 + 3


# -- the budget edge: the hand-tuned baseline, found before the search -------------------------------
def _edge_space() -> SearchSpace:
    return SearchSpace.from_dict({
        "layers": [{"name": "stem", "pattern": "conv1", "bits": [8, 32]},
                   {"name": "body", "pattern": "conv2", "bits": [4, 8],
                    "prune": {"low": 0.0, "high": 0.75, "step": 0.125}},
                   {"name": "head", "pattern": "fc", "bits": [8, 32], "prune": [0.0, 0.5]}],
        "finetune": {"steps": [10, 20], "lr": {"low": 0.001, "high": 0.01, "log": True}},
    }, source="edge.yaml").bind(["conv1", "conv2", "fc"])


def test_uniform_ratios_are_every_rules_pruning_steps():
    from autoshrink.search import uniform_ratios

    assert uniform_ratios(_edge_space()) == [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75]


@pytest.mark.parametrize("budget_ms, edge", [(9.0, 0.0), (7.5, 0.25), (6.1, 0.75), (5.0, None)])
def test_budget_edge_bisects_to_the_smallest_uniform_ratio_that_meets_the_budget(monkeypatch, budget_ms, edge):
    import autoshrink.trial as trial_mod
    from autoshrink.search import TrialSettings, budget_edge

    timed = []

    def fake_evaluate(task, cand, budget, ctx):  # latency falls with pruning: 8 ms unpruned, 6 at 75 %
        ratio = cand.prune_for("conv2")
        timed.append(ratio)
        return trial_mod.TrialResult(latency_ms=8.0 - 8 / 3 * ratio, size_mb=1.0, mmacs=10.0)

    monkeypatch.setattr(trial_mod, "evaluate", fake_evaluate)
    settings = TrialSettings(threads=1, latency_threads=1, latency_runs=5, seed=0, lock_dir=None)
    found = budget_edge(None, _edge_space(), Budget(latency_ms=budget_ms), settings)
    assert found["prune"] == edge and not found["error"]
    if edge is None:
        assert timed == [0.0, 0.75]  # even the most pruned misses: the fixed baselines are used
        return
    assert len(timed) == len(set(timed)) <= 5  # bisection: each ratio once, both ends + log2(6)
    for ratio, latency, _, _, ok in found["probes"]:
        assert ok == (latency <= budget_ms) and ok == (ratio >= edge)


def test_a_probe_already_taken_is_not_timed_again(monkeypatch):
    # the search takes the edge's unpruned probe before its reachability check; the edge reuses it
    import autoshrink.trial as trial_mod
    from autoshrink.search import TrialSettings, budget_edge
    from autoshrink.search.preflight import edge_probe

    timed = []

    def fake_evaluate(task, cand, budget, ctx):
        ratio = cand.prune_for("conv2")
        timed.append(ratio)
        return trial_mod.TrialResult(latency_ms=8.0 - 8 / 3 * ratio, size_mb=1.0, mmacs=10.0)

    monkeypatch.setattr(trial_mod, "evaluate", fake_evaluate)
    settings = TrialSettings(threads=1, latency_threads=1, latency_runs=5, seed=0, lock_dir=None)
    budget = Budget(latency_ms=7.5)
    first = edge_probe(None, _edge_space(), budget, settings)
    assert first == [0.0, 8.0, 1.0, 10.0, False] and timed == [0.0]
    found = budget_edge(None, _edge_space(), budget, settings, probes=[first], probes_s=30.0)
    assert found["prune"] == 0.25 and found["probes"][0] == first
    assert found["seconds"] >= 30.0  # the probe taken before counts in the edge's time
    assert timed.count(0.0) == 1 and len(timed) == len(found["probes"])


def test_a_probe_that_meets_the_budget_makes_the_reachability_check_time_nothing(tiny_task, tiny_space,
                                                                                 monkeypatch):
    import autoshrink.trial
    from autoshrink.search import TrialSettings, check_reachable
    from autoshrink.trial import TrialResult

    seen = []

    def fake_evaluate(task, cand, budget, ctx):
        seen.append(cand)
        return TrialResult(latency_ms=3.0)

    monkeypatch.setattr(autoshrink.trial, "evaluate", fake_evaluate)
    settings = TrialSettings(threads=1, latency_threads=1, latency_runs=5, seed=0, lock_dir=None)
    budget = ash.Budget(latency_ms=1.0)
    assert check_reachable(tiny_task, tiny_space, budget, settings, latency=True,
                           met=[0.0, 0.9, 0.01, 1.0, True]) == []
    assert seen == []
    # a probe that misses proves nothing: the cheapest configuration is timed (and refused here)
    with pytest.raises(SearchError, match=r"has latency_ms 3 ms > 1\b"):
        check_reachable(tiny_task, tiny_space, budget, settings, latency=True, met=[0.0, 1.2, 0.01, 1.0, False])
    assert len(seen) == 3


def test_baselines_start_at_the_budget_edge():
    space = _edge_space()

    def ratios(edge):
        return [c.default_prune for c in baselines(space, space_defaults(space), edge)]

    assert ratios(None) == [0.0, 0.25, 0.5]
    assert ratios(0.0) == [0.0, 0.25, 0.5]
    assert ratios(0.375) == [0.375, 0.5]
    assert ratios(0.625) == [0.625, 0.75]  # the next step up: a margin for timing noise
    # the enqueued parameters are the space's own values (the head's pruning snaps to its choices)
    params = space.candidate_params(baselines(space, space_defaults(space), 0.375)[0])
    assert params["prune.body"] == 0.375 and params["prune.head"] == 0.5


def test_candidates_over_the_budget_do_not_count_up_to_the_screen_limit(tmp_path):
    # trials=N asks for N fine-tunes: a candidate the budget gate rejects costs seconds, not a
    # fine-tune, and does not count, until 'screen_limit' of them have been rejected
    from autoshrink.search import accounting

    study = optuna.create_study(directions=STUDY_DIRECTIONS)
    outcomes = ["screened", "fine-tuned", "screened", "failed", "screened", "screened", "pruned"]
    for outcome in outcomes:
        t = study.ask()
        t.set_user_attr(TrialAttr.MEETS_BUDGET, outcome != "screened")
        t.set_user_attr(TrialAttr.FINETUNE_S, 0.0 if outcome == "screened" else 5.0)
        if outcome == "failed":
            study.tell(t, state=State.FAIL.optuna)
        elif outcome == "pruned":
            study.tell(t, state=State.PRUNED.optuna)
        else:
            study.tell(t, [0.0 if outcome == "screened" else 90.0, 2.0])
    running = study.ask()
    for limit, committed in ((0, 8), (2, 6), (4, 4), (10, 4)):
        trials = study.get_trials(deepcopy=False)
        assert accounting.committed(trials, limit) == committed  # the running trial counts until it is told
        assert accounting.finished(trials, limit) == committed - 1
        assert accounting.is_surplus(trials, running.number, committed - 1, limit)
        assert not accounting.is_surplus(trials, running.number, committed, limit)


@pytest.mark.parametrize("budget, told", [(Budget(latency_ms=4.0), 4.0), (Budget(size_mb=1.0), 2.0)])
def test_under_a_latency_budget_the_sampler_is_not_rewarded_for_being_faster(tmp_path, budget, told):
    # the goal is the most accurate model within the budget: a feasible trial's latency is told
    # to the sampler as the budget itself, while trials.csv keeps what was measured
    space = SearchSpace.default()
    study = optuna.create_study(directions=STUDY_DIRECTIONS)
    driver = Driver(task=None, space=space, study=study, config=DriverConfig(budget=budget, out=tmp_path))
    trial = study.ask()
    cand = space.sample(trial)
    driver.tell(trial, cand, {"state": State.COMPLETE, "accuracy": 91.0, "latency_ms": 2.0, "size_mb": 0.5,
                               "mmacs": 1.0, "meets_budget": True, "finetune_s": 3.0})
    done = study.trials[0]
    assert done.values == [91.0, told] and done.user_attrs[TrialAttr.LATENCY_MS] == 2.0
    over = study.ask()
    driver.tell(over, space.sample(over), {"state": State.COMPLETE, "latency_ms": 9.0, "size_mb": 5.0,
                                            "mmacs": 1.0, "meets_budget": False, "finetune_s": 0.0})
    assert study.trials[1].values == [0.0, 9.0]  # infeasible: measured latency, no accuracy


# -- the reachability check before a search ---------------------------------------------------------


@pytest.mark.parametrize(("timings", "refused", "calls"), [
    ([3.0, 1.1], False, 2),      # one slow timing (another tenant's burst) is measured again
    ([3.0, 2.0, 1.6], True, 3),  # over 1.25 x the budget every time: refused, with the fastest
])
def test_an_unreachable_latency_budget_is_measured_again_before_refusing(
        tiny_task, tiny_space, monkeypatch, timings, refused, calls):
    import autoshrink.trial
    from autoshrink.search import TrialSettings, check_reachable
    from autoshrink.trial import TrialResult

    seen = []

    def fake_evaluate(task, cand, budget, ctx):
        seen.append(cand)
        return TrialResult(latency_ms=timings[len(seen) - 1])

    monkeypatch.setattr(autoshrink.trial, "evaluate", fake_evaluate)
    settings = TrialSettings(threads=1, latency_threads=1, latency_runs=5, seed=0, lock_dir=None)
    budget = ash.Budget(latency_ms=1.0)
    if refused:
        with pytest.raises(SearchError, match=r"has latency_ms 1\.6 ms > 1\b"):
            check_reachable(tiny_task, tiny_space, budget, settings, latency=True)
    else:
        check_reachable(tiny_task, tiny_space, budget, settings, latency=True)
    assert len(seen) == calls

"""The solver's proposals: the knapsack against brute force, and real proposals on a tiny task."""

from __future__ import annotations

import itertools
import math

import pytest

from autoshrink.record import FIXED_PARAMS, TrialAttr
from autoshrink.search.solver import (
    Choice,
    Problem,
    reference_choice,
    rule_choices,
    solve,
    solve_shifted,
    to_candidate,
)

LAT, SIZE = TrialAttr.LATENCY_MS, TrialAttr.SIZE_MB

# 3 rules x 4 choices, hand-written: the drop falls as the cost rises, not in step across rules
DROPS = [[0.0, 0.4, 1.5, 6.0], [0.0, 0.2, 2.5, 3.0], [0.0, 1.0, 1.1, 9.0]]
COSTS = {
    LAT: [[0.0, -1.0, -2.0, -3.5], [0.0, -0.5, -2.5, -3.0], [0.0, -1.5, -1.75, -4.0]],
    SIZE: [[0.0, -0.5, -1.0, -1.0], [0.0, -2.0, -2.0, -3.0], [0.0, -0.25, -1.0, -2.0]],
}
BASE = {LAT: 10.0, SIZE: 8.0}


def problem() -> Problem:
    return Problem(("a", "b", "c"), [list("wxyz")] * 3, DROPS, COSTS, BASE)


def brute(p: Problem, limits: dict, avoid=(), min_diff: int = 2) -> float | None:
    """The least drop over every combination that meets the limits and differs from each of
    ``avoid`` in at least ``min_diff`` rules; None when there is none."""
    best = None
    for picks in itertools.product(*(range(len(c)) for c in p.choices)):
        got = p.predicted(picks)
        if any(got[m] > v + 1e-9 for m, v in limits.items()):
            continue
        if any(sum(a != b for a, b in zip(picks, other, strict=True)) < min_diff for other in avoid):
            continue
        d = p.drop(picks)
        best = d if best is None else min(best, d)
    return best


def meets(p: Problem, picks, limits) -> bool:
    return all(p.predicted(picks)[m] <= v + 1e-9 for m, v in limits.items())


# latency limits from loose to the least reachable (10 - 3.5 - 3 - 4 = -0.5 is every rule at its
# cheapest) and below; "exactly at the budget": 10 - 2 - 2.5 - 1.5 = 4.0 is the sum of listed costs
BUDGETS = [
    {LAT: 20.0}, {LAT: 8.5}, {LAT: 7.0}, {LAT: 4.0}, {LAT: 2.0}, {LAT: -0.5}, {LAT: -0.6},
    {LAT: 6.0, SIZE: 5.0}, {LAT: 4.0, SIZE: 4.5}, {SIZE: 5.75}, {SIZE: 2.0}, {SIZE: 1.9},
]


@pytest.mark.parametrize("limits", BUDGETS, ids=lambda b: ",".join(f"{k}<={v:g}" for k, v in b.items()))
def test_the_best_solution_is_the_brute_force_optimum(limits):
    p = problem()
    want = brute(p, limits, min_diff=1)
    found = solve(p, limits, k=1)
    if want is None:
        assert found == []
        return
    (sol,) = found
    assert meets(p, sol.picks, limits)
    assert sol.drop == pytest.approx(want, abs=1e-9)
    assert sol.drop == pytest.approx(p.drop(sol.picks))
    assert sol.predicted == pytest.approx(p.predicted(sol.picks))


def test_a_budget_met_exactly_is_met():
    p = problem()
    limits = {LAT: 10.0 - 2.0 - 2.5 - 1.5}
    (sol,) = solve(p, limits, k=1)
    # the cheapest-drop way to shed 6 ms lands on the budget itself
    assert sol.predicted[LAT] == pytest.approx(limits[LAT])
    assert sol.drop == pytest.approx(brute(p, limits, min_diff=1))


@pytest.mark.parametrize("limits", BUDGETS, ids=lambda b: ",".join(f"{k}<={v:g}" for k, v in b.items()))
def test_the_top_three_differ_in_two_rules_and_are_each_optimal_given_the_earlier(limits):
    p = problem()
    found = solve(p, limits, k=3)
    earlier = []
    for sol in found:
        assert meets(p, sol.picks, limits)
        assert sol.drop == pytest.approx(brute(p, limits, avoid=earlier), abs=1e-9)
        earlier.append(sol.picks)
    for a, b in itertools.combinations([s.picks for s in found], 2):
        assert sum(x != y for x, y in zip(a, b, strict=True)) >= 2
    if len(found) < 3:  # it stopped because nothing else is feasible and far enough from the others
        assert brute(p, limits, avoid=earlier) is None


def _interacting(p: Problem):
    """Whole-solution costs that do not add up: rule a's cheap choices make b's costlier (as
    pruning one rule shrinks the next one's inputs, whose bytes depend on that rule's bits)."""
    def exact(picks):
        got = p.predicted(picks)
        return {m: v + 0.6 * picks[0] * (3 - picks[1]) / 3 for m, v in got.items()}
    return exact


@pytest.mark.parametrize("limits", BUDGETS, ids=lambda b: ",".join(f"{k}<={v:g}" for k, v in b.items()))
def test_solutions_costed_as_a_whole_meet_the_limits_and_are_optimal_among_those_that_do(limits):
    p = problem()
    exact = _interacting(p)
    found = solve(p, limits, k=3, exact=exact, max_checks=64)
    earlier = []

    def whole_meets(picks):
        return all(exact(picks)[m] <= v + 1e-9 for m, v in limits.items())

    for sol in found:
        assert whole_meets(sol.picks) and sol.predicted == pytest.approx(exact(sol.picks))
        best = None
        for picks in itertools.product(*(range(len(c)) for c in p.choices)):
            if not (whole_meets(picks) and meets(p, picks, limits)):
                continue  # the knapsack only proposes what its own (additive) costs allow
            if any(sum(a != b for a, b in zip(picks, o, strict=True)) < 2 for o in earlier):
                continue
            best = p.drop(picks) if best is None else min(best, p.drop(picks))
        assert sol.drop == pytest.approx(best, abs=1e-9)
        earlier.append(sol.picks)


def test_the_whole_solution_checks_are_bounded():
    p = problem()
    calls = []

    def never(picks):
        calls.append(picks)
        return {LAT: 1e9}

    assert solve(p, {LAT: 20.0}, k=3, exact=never, max_checks=5) == []
    assert len(calls) == 5 and len(set(calls)) == 5  # each rejected solution is cut off alone


@pytest.mark.parametrize("limit", [8.5, 7.0, 4.0, 2.0])
def test_optimistic_additive_costs_are_re_solved_with_the_miss(limit):
    # the whole cost reads 0.5 above the additive one for every combination (a ResNet-18's latency
    # table summed 2.85 ms for combinations costed 3.13 ms as a whole): with two checks, solve
    # spends them on the additive boundary and finds nothing; solve_shifted raises the base by
    # the miss and finds the optimum of the whole costs
    p = problem()
    calls = []

    def biased(picks):
        calls.append(picks)
        return {m: v + 0.5 for m, v in p.predicted(picks).items()}

    limits = {LAT: limit}
    assert solve(p, limits, k=1, exact=biased, max_checks=2) == []
    found, shift = solve_shifted(p, limits, k=3, exact=biased, max_checks=2)
    assert shift == {LAT: pytest.approx(0.5)}
    assert found, calls
    # the same problem with the bias in its base: the optimum of what meets the limit as a whole
    want = brute(Problem(p.labels, p.choices, p.drops, p.costs, {**BASE, LAT: BASE[LAT] + 0.5}), limits,
                 min_diff=1)
    assert found[0].drop == pytest.approx(want, abs=1e-9)
    for sol in found:
        assert sol.predicted[LAT] == pytest.approx(biased(sol.picks)[LAT]) and sol.predicted[LAT] <= limit + 1e-9


def test_shifting_keeps_a_first_solve_that_found_enough():
    p = problem()
    exact = _interacting(p)
    plain = solve(p, {LAT: 8.5}, k=3, exact=exact)
    found, shift = solve_shifted(p, {LAT: 8.5}, k=3, exact=exact)
    assert len(plain) == 3 and shift == {} and [s.picks for s in found] == [s.picks for s in plain]


def test_equal_drops_prefer_headroom():
    # both choices of rule "b" drop nothing; the faster one is taken
    p = Problem(("a", "b"), [[0, 1], [0, 1]], [[0.0, 1.0], [0.0, 0.0]],
                {LAT: [[0.0, -2.0], [0.0, -1.0]]}, {LAT: 5.0})
    (sol,) = solve(p, {LAT: 5.0}, k=1)
    assert sol.picks == (0, 1)


def test_bad_problems_are_refused_with_their_rule():
    with pytest.raises(ValueError, match="'b'"):
        Problem(("a", "b"), [[0], [0, 1]], [[0.0], [0.0]])
    with pytest.raises(ValueError, match="no base"):
        Problem(("a",), [[0]], [[0.0]], {LAT: [[0.0]]}, {})
    with pytest.raises(ValueError, match="costs only for"):
        solve(Problem(("a",), [[0]], [[0.0]]), {LAT: 1.0})
    # negative drops (noise) count as none
    assert Problem(("a",), [[0, 1]], [[-0.3, 1.0]]).drops == ((0.0, 1.0),)


def test_rule_choices_and_candidates_follow_the_space():
    from autoshrink import SearchSpace
    from autoshrink.search.baselines import space_defaults

    space = SearchSpace.from_dict({
        "layers": [
            {"name": "stem", "pattern": "conv1", "bits": [8, 32]},
            {"name": "body", "pattern": "layer*", "bits": 8, "prune": {"low": 0.0, "high": 0.3}},
            {"name": "head", "pattern": "fc", "prune": [0.0, 0.5]},
        ],
        "distill": {"temperature": [2.0, 4.0]},
    })
    choices = dict(rule_choices(space))
    assert choices["stem"] == [Choice(8, None), Choice(32, None)]
    # a continuous range: its eighths and its top
    assert [c.prune for c in choices["body"]] == [0.0, 0.125, 0.25, 0.3]
    assert {c.bits for c in choices["body"]} == {8}
    assert choices["head"] == [Choice(None, 0.0), Choice(None, 0.5)]
    cand = to_candidate(space, {"stem": Choice(8, None), "body": Choice(8, 0.25), "head": Choice(None, 0.5)})
    assert cand.bits_for("conv1") == 8 and cand.prune_for("layer1.0.conv1") == 0.25 and cand.prune_for("fc") == 0.5
    assert cand.kd_temperature == space_defaults(space).kd_temperature
    assert space.candidate_params(cand) == {"bits.stem": 8, "prune.body": 0.25, "prune.head": 0.5,
                                            "kd_temperature": 2.0}


@pytest.mark.slow
def test_proposals_on_a_tiny_task_are_candidates_of_its_space(tiny_task, tiny_space, tmp_path, monkeypatch):
    """Real sensitivity (cached on the second call) and real size/MACs; a size budget (no latency
    table to time) that the teacher misses."""
    import autoshrink as ash
    from autoshrink.measure.flops import model_cost
    from autoshrink.plan import check_space
    from autoshrink.search.baselines import as_sampled
    from autoshrink.search.solver import propose

    monkeypatch.setenv("AUTOSHRINK_CACHE", str(tmp_path))
    space = check_space(tiny_task.model, tiny_task.example_input, tiny_space)
    teacher = model_cost(tiny_task.model, tiny_task.example_input, {})
    budget = ash.Budget(size_mb=teacher.size_mb * 0.3)
    first = propose(tiny_task, space, budget, limit=64)
    assert first.warning == "" and not first.cached
    assert 1 <= len(first.candidates) <= 3
    for cand, sol in zip(first.candidates, first.solutions, strict=True):
        assert as_sampled(space, cand) == cand  # exactly a point of the space
        assert sol["predicted"][SIZE] <= budget.size_mb + 1e-9 and sol["drop"] >= 0
    again = propose(tiny_task, space, budget, limit=64)
    assert again.cached and [c.to_dict() for c in again.candidates] == [c.to_dict() for c in first.candidates]
    assert "sensitivity cached" in again.line()
    # a budget nothing meets: no proposals, a warning, no exception
    none = propose(tiny_task, space, ash.Budget(size_mb=1e-6), limit=64)
    assert none.candidates == [] and "no proposals" in none.warning and math.isfinite(none.seconds)


def _enqueue(monkeypatch, proposals, *, solver=True, trials=6, budget=None):
    """Run the search's enqueue step on a fresh study with a faked budget edge and solver."""
    import importlib
    import types

    import optuna

    import autoshrink as ash
    from autoshrink.record import STUDY_DIRECTIONS
    from autoshrink.search import TrialSettings

    search_pkg = importlib.import_module("autoshrink.search")  # the package (ash.search is the function)
    solver_mod = importlib.import_module("autoshrink.search.solver")
    monkeypatch.setattr(search_pkg, "budget_edge", lambda *a, **k: {"prune": 0.25, "probes": [[0.25, 4.0, 1, 1, True]],
                                                                    "seconds": 1.0, "error": ""})
    asked = []

    def fake_propose(task, space, budget, **kwargs):
        asked.append(kwargs)
        return proposals

    monkeypatch.setattr(solver_mod, "propose", fake_propose)
    space = ash.SearchSpace.from_dict({"layers": [{"name": "all", "pattern": "*", "bits": [4, 8],
                                                   "prune": [0.0, 0.25, 0.5, 0.75]}]}, source="s.yaml")
    study = optuna.create_study(directions=STUDY_DIRECTIONS)
    config = types.SimpleNamespace(time_here=True, settings=TrialSettings(), progress=True, trials=trials,
                                   solver=solver)
    search_pkg._enqueue_baselines(None, space, budget or ash.Budget(latency_ms=5.0), config, study)
    return study, asked


def test_proposals_are_enqueued_after_the_budget_edge_and_marked(monkeypatch, capsys):
    import autoshrink as ash
    from autoshrink.record import Proposer, StudyAttr
    from autoshrink.search.solver import Proposals

    cand = to_candidate
    space = ash.SearchSpace.from_dict({"layers": [{"name": "all", "pattern": "*", "bits": [4, 8],
                                                   "prune": [0.0, 0.25, 0.5, 0.75]}]})
    picks = [cand(space, {"all": Choice(4, 0.25)}), cand(space, {"all": Choice(4, 0.75)})]
    found = Proposals(candidates=picks, solutions=[{"drop": 1.0}, {"drop": 2.0}], seconds=41.0, cached=True)
    study, asked = _enqueue(monkeypatch, found)
    waiting = study.get_trials(deepcopy=False)
    params = [(t.system_attrs[FIXED_PARAMS], t.user_attrs[TrialAttr.PROPOSED_BY]) for t in waiting]
    assert params == [({"bits.all": 8, "prune.all": 0.25}, Proposer.BASELINE),
                      ({"bits.all": 4, "prune.all": 0.25}, Proposer.SOLVER),
                      ({"bits.all": 4, "prune.all": 0.75}, Proposer.SOLVER),
                      ({"bits.all": 8, "prune.all": 0.5}, Proposer.BASELINE)]
    assert study.user_attrs[StudyAttr.SOLVER]["proposals"] == [{"drop": 1.0}, {"drop": 2.0}]
    assert "solver: 2 proposals in 41 s (sensitivity cached)" in capsys.readouterr().out
    # the edge probe anchors the latency table
    (kwargs,) = asked
    assert [ms for _, ms in kwargs["anchors"]] == [4.0]
    # the trial count caps proposals as it caps baselines
    study, _ = _enqueue(monkeypatch, found, trials=2)
    assert [t.user_attrs[TrialAttr.PROPOSED_BY] for t in study.trials] == [Proposer.BASELINE, Proposer.SOLVER]
    # a single trial is the first plan's: the solver is not asked (its minutes would buy nothing)
    study, asked_once = _enqueue(monkeypatch, found, trials=1)
    assert asked_once == [] and [t.user_attrs[TrialAttr.PROPOSED_BY] for t in study.trials] == [Proposer.BASELINE]
    # a proposal equal to the edge baseline takes no slot: the next proposal comes second
    same = Proposals(candidates=[cand(space, {"all": Choice(8, 0.25)}), *picks], solutions=[{}, {}, {}])
    study, _ = _enqueue(monkeypatch, same, trials=2)
    assert [t.system_attrs[FIXED_PARAMS] for t in study.trials] == [{"bits.all": 8, "prune.all": 0.25},
                                                                     {"bits.all": 4, "prune.all": 0.25}]


def test_no_solver_and_a_failed_solver_enqueue_the_baselines_alone(monkeypatch, capsys):
    from autoshrink.record import Proposer, StudyAttr
    from autoshrink.search.solver import Proposals

    study, asked = _enqueue(monkeypatch, Proposals(), solver=False)
    assert asked == [] and StudyAttr.SOLVER not in study.user_attrs
    assert {t.user_attrs[TrialAttr.PROPOSED_BY] for t in study.trials} == {Proposer.BASELINE}
    failed = Proposals(seconds=2.0, warning="the solver failed (RuntimeError: boom); no proposals")
    study, _ = _enqueue(monkeypatch, failed)
    assert len(study.trials) == 2  # the edge, then the next step up
    assert any("the solver failed (RuntimeError: boom)" in line for line in study.user_attrs[StudyAttr.WARNINGS])
    assert "warning: solver: 0 proposals in 2 s; the solver failed" in capsys.readouterr().out


@pytest.mark.parametrize(("flag", "solver"), [([], True), (["--no-solver"], False)])
def test_the_command_line_turns_the_solver_off(monkeypatch, flag, solver):
    import autoshrink as ash
    from autoshrink import cli

    got = {}

    class Stop(Exception):
        pass

    def fake_search(task, space, budget, **kwargs):
        got.update(kwargs)
        raise Stop

    monkeypatch.setattr(ash, "search", fake_search)
    monkeypatch.setattr(cli, "_build_task", lambda args: None)
    monkeypatch.setattr(cli, "_check_reachable_early", lambda *a, **k: None)
    assert cli.main(["search", "--budget-ms", "5", *flag]) == 1  # Stop: an internal error, after the call
    assert got["solver"] is solver


def test_costs_are_taken_at_the_int8_operating_point_where_transitions_add_up(monkeypatch):
    """A chain of three rules whose latency is each layer's cost plus 0.2 ms per fp32<->int8
    boundary (the input and output are fp32): measured from all-int8, the summed costs give
    all-int8 exactly, so a budget only all-int8 meets is feasible. From the fp32 teacher each
    rule's int8 paid for two boundaries and all-int8 summed to 2.7 ms instead of 1.9 ms."""
    import pandas as pd

    from autoshrink import SearchSpace
    from autoshrink.search import solver as solver_mod
    from autoshrink.sensitivity import COLUMNS

    space = SearchSpace.from_dict({"layers": [
        {"name": "stem", "pattern": "conv1", "bits": [32, 8]},
        {"name": "body", "pattern": "layer1", "bits": [32, 8]},
        {"name": "head", "pattern": "fc", "bits": [32, 8]},
    ]})
    order = ["conv1", "layer1", "fc"]

    class ChainCost:
        metrics = [LAT]

        def __call__(self, cand):
            bits = [cand.bits.get(n, cand.default_bits) for n in order]
            q = [False, *(b < 32 for b in bits), False]  # fp32 in, fp32 out
            boundaries = sum(a != b for a, b in zip(q[:-1], q[1:], strict=True))
            return {LAT: sum(0.5 if b < 32 else 1.0 for b in bits) + 0.2 * boundaries}

    monkeypatch.setattr(solver_mod, "sensitivity_table", lambda *a, **k: (pd.DataFrame(columns=list(COLUMNS)), True))
    problem, _ = solver_mod.measure_problem(None, space, ChainCost())
    int8 = tuple(row.index(Choice(8, None)) for row in problem.choices)
    assert problem.predicted(int8)[LAT] == pytest.approx(1.9)
    assert [s.picks for s in solve(problem, {LAT: 2.0}, k=1)] == [int8]
    assert [reference_choice(c) for _, c in rule_choices(space)] == [Choice(8, None)] * 3


def test_a_solver_past_its_time_limit_proposes_nothing_and_says_so(monkeypatch):
    import autoshrink as ash
    from autoshrink import SearchSpace
    from autoshrink.search import solver as solver_mod

    costed = []

    def measure(task, space, coster, limit):
        costed.append(1)
        coster(ash.Candidate())  # the first costing is already past a 0 s limit
        raise AssertionError("not reached")

    monkeypatch.setattr(solver_mod, "measure_problem", measure)
    space = SearchSpace.from_dict({"layers": [{"name": "all", "pattern": "*", "bits": [8, 32]}]})
    found = solver_mod.propose(None, space, ash.Budget(size_mb=1.0), seconds=0)
    assert costed and found.candidates == [] and "ran past its 0 s (AUTOSHRINK_SOLVER_SECONDS)" in found.warning
    monkeypatch.setenv("AUTOSHRINK_SOLVER_SECONDS", "soon")
    with pytest.raises(ValueError, match="AUTOSHRINK_SOLVER_SECONDS must be a number of seconds, got 'soon'"):
        solver_mod.default_seconds()


# -- the latency limit as a lazy constraint ----------------------------------------------------------
class _CountingCost:
    """Size and latency of a 3-rule space from its bits, counting the latency asks (each would
    time table entries); ``relaxed()`` shares the count, as :class:`Coster` shares its work."""

    order = ["conv1", "layer1", "fc"]
    size = {"conv1": 1.0, "layer1": 4.0, "fc": 2.0}

    def __init__(self, metrics, asked=None):
        self.metrics = list(metrics)
        self.asked = [] if asked is None else asked

    def relaxed(self):
        return _CountingCost([m for m in self.metrics if m != LAT], self.asked)

    def __call__(self, cand):
        bits = {n: cand.bits.get(n, cand.default_bits) for n in self.order}
        out = {SIZE: sum(self.size[n] * bits[n] / 32 for n in self.order)}
        if LAT in self.metrics:
            self.asked.append(cand)
            out[LAT] = sum(0.5 if b < 32 else 1.0 for b in bits.values())
        return {m: out[m] for m in self.metrics}


@pytest.fixture
def lazy_setup(monkeypatch):
    import pandas as pd

    from autoshrink import SearchSpace
    from autoshrink.search import solver as solver_mod

    space = SearchSpace.from_dict({"layers": [
        {"name": "stem", "pattern": "conv1", "bits": [32, 8]},
        {"name": "body", "pattern": "layer1", "bits": [32, 8]},
        {"name": "head", "pattern": "fc", "bits": [32, 8]},
    ]})
    drops = pd.DataFrame({"layer": ["stem", "body", "head"], "kind": ["bits"] * 3, "value": [8.0] * 3,
                          "accuracy": [90.0] * 3, "drop": [1.0, 0.5, 2.0], "params": [0] * 3})
    monkeypatch.setattr(solver_mod, "sensitivity_table", lambda *a, **k: (drops, True))
    return space, solver_mod


def test_a_latency_limit_that_does_not_bind_times_only_the_solutions(lazy_setup):
    space, solver_mod = lazy_setup
    limits = {LAT: 10.0, SIZE: 4.0}  # size binds (the body must be 8 bits); any choice meets the latency
    cost = _CountingCost([LAT, SIZE])
    _, lazy, binds, _, _ = solver_mod._solve_latency_last(None, space, cost, limits, k=3, limit=64, base=None)
    assert lazy and binds is False and len(cost.asked) == len(lazy)  # the solutions' latency alone was asked
    full, _ = solver_mod.measure_problem(None, space, _CountingCost([LAT, SIZE]))
    assert [s.picks for s in lazy] == [s.picks for s in solve(full, limits, k=3)]
    assert all(s.predicted[LAT] <= 10.0 and s.predicted[SIZE] <= 4.0 for s in lazy)


def test_a_latency_limit_that_binds_is_left_to_the_whole_problem(lazy_setup):
    space, solver_mod = lazy_setup
    limits = {LAT: 2.0, SIZE: 4.0}  # the best under the size limit alone (only the body at 8 bits) is 2.5 ms
    cost = _CountingCost([LAT, SIZE])
    _, lazy, binds, _, _ = solver_mod._solve_latency_last(None, space, cost, limits, k=3, limit=64, base=None)
    assert lazy == [] and binds is True and len(cost.asked) == 1  # stopped at the first solution that misses
    full, _ = solver_mod.measure_problem(None, space, cost)
    found = solve(full, limits, k=1)
    assert found and found[0].predicted[LAT] <= 2.0


def test_other_limits_nothing_meets_need_no_latency_at_all(lazy_setup):
    space, solver_mod = lazy_setup
    cost = _CountingCost([LAT, SIZE])
    _, lazy, binds, _, _ = solver_mod._solve_latency_last(None, space, cost, {LAT: 10.0, SIZE: 0.5}, k=3, limit=64,
                                                       base=None)
    assert lazy == [] and binds is False and cost.asked == []  # no latency asked: the whole budget is unmet too

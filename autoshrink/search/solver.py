"""Proposals from a solver: per-rule sensitivity and per-rule cost, as a multiple-choice knapsack.

Before the sampler's first trial, the search can decide what to try first the way HAWQ-V3 or
ModelOpt's ``auto_quantize`` do: measure what each rule's choices cost in accuracy (no
fine-tune, :func:`autoshrink.sensitivity.sensitivity` on a small calibration slice, cached per
teacher and space) and in latency / size / MACs (the per-machine latency table of
:mod:`autoshrink.measure.predictor`, the exact counts of :mod:`autoshrink.measure.flops`), then
pick one choice per rule minimising the summed drop under every budgeted cost, with
``scipy.optimize.milp``. The proposals are only a starting order: every one is still measured
for real by the budget gate, and fine-tuned only if it meets the budget.

Two halves, kept apart so the solver is tested without a model:

- the problem: :class:`Problem` (plain numbers per rule and choice) and :func:`solve` (top-k
  solutions that differ pairwise in at least two rule choices, by no-good cuts);
- the measurements: :func:`rule_choices` (the space's discrete choices per rule, through
  :meth:`SearchSpace.knobs`), :func:`sensitivity_table`, :func:`measure_problem`; and
  :func:`propose`, which ties them and turns the solutions into :class:`Candidate` s.

Assumptions, stated: a rule's drops add up (``drop(bits, prune) = drop(bits) + drop(prune)``, and
over rules), negative drops (noise) count as 0; costs add up over rules relative to the
reference (every rule's layers at 8 bits where it offers them, unpruned: the operating point of
a budget that binds, :func:`reference_choice`; layers no rule sets at the space's defaults), and
each solution is then priced again as a whole candidate. A ``per_layer`` rule takes one choice for all its layers here.

Long module (~780 lines): the problem, the measurements that fill it and the proposals made
from its solutions share one format (:class:`Choice`, :class:`Problem`); split the measurements
out if a second source of costs appears.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import TYPE_CHECKING, Any

from autoshrink.record import TrialAttr

if TYPE_CHECKING:
    import pandas as pd

    from autoshrink.budget import Budget
    from autoshrink.candidate import Candidate
    from autoshrink.space import SearchSpace
    from autoshrink.task import Task

__all__ = [
    "CONTINUOUS_STEP",
    "DEFAULT_LIMIT",
    "Choice",
    "Coster",
    "Problem",
    "Proposals",
    "Solution",
    "SolverTimeout",
    "default_seconds",
    "measure_problem",
    "propose",
    "reference_choice",
    "rule_choices",
    "sensitivity_table",
    "solve",
    "to_candidate",
]

#: pruning ratios tried on a continuous range (no ``step``): ``low``, ``low + 0.125``, ... and ``high``
CONTINUOUS_STEP = 0.125
#: validation samples the sensitivity is measured on
DEFAULT_LIMIT = 256
#: the metrics a budget limits, in the order they are reported
METRICS = (TrialAttr.LATENCY_MS, TrialAttr.SIZE_MB, TrialAttr.MMACS)
_RULE_KNOB = re.compile(r"^layers\[(\d+)\]\.(bits|prune)$")
_CACHE_VERSION = "v2"  # v2: pruned settings scored with re-estimated BatchNorm statistics


# --------------------------------------------------------------------------------------------
# the problem
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One choice of one rule: its weight bits and pruning ratio (None: the rule sets no such knob)."""

    bits: int | None = None
    prune: float | None = None

    def describe(self) -> str:
        parts = ([] if self.bits is None else [f"{self.bits}b"]) + ([] if self.prune is None else [f"p{self.prune:g}"])
        return "/".join(parts) or "-"


@dataclass(frozen=True)
class Problem:
    """A multiple-choice knapsack: pick one choice per rule.

    Args:
        labels: the rules, in order.
        choices: per rule, its choices (any values; :class:`Choice` from :func:`measure_problem`).
        drops: per rule and choice, the accuracy drop (points, finite, >= 0 after clipping).
        costs: metric -> per rule and choice, the change of that metric from ``base``.
        base: metric -> its value at the reference; a solution's predicted value is ``base`` plus
            its choices' changes.

    Raises:
        ValueError: shapes that do not match, a rule without choices, a drop that is not finite,
            a cost metric without a base.
    """

    labels: tuple[str, ...]
    choices: tuple[tuple[Any, ...], ...]
    drops: tuple[tuple[float, ...], ...]
    costs: Mapping[str, tuple[tuple[float, ...], ...]] = field(default_factory=dict)
    base: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "choices", tuple(tuple(c) for c in self.choices))
        object.__setattr__(self, "drops", tuple(tuple(max(0.0, float(d)) for d in row) for row in self.drops))
        object.__setattr__(self, "costs", {m: tuple(tuple(float(v) for v in row) for row in rows)
                                           for m, rows in dict(self.costs).items()})
        object.__setattr__(self, "base", {m: float(v) for m, v in dict(self.base).items()})
        sizes = [len(c) for c in self.choices]
        if len(self.labels) != len(sizes) or len(self.drops) != len(sizes):
            raise ValueError(f"{len(self.labels)} labels, {len(sizes)} choice lists and {len(self.drops)} drop "
                             "lists: give one of each per rule")
        for label, n, row in zip(self.labels, sizes, self.drops, strict=True):
            if n == 0:
                raise ValueError(f"rule {label!r} has no choices")
            if len(row) != n or not all(math.isfinite(d) for d in row):
                raise ValueError(f"rule {label!r}: give one finite drop per choice ({n}), got {list(row)}")
        for metric, rows in self.costs.items():
            if metric not in self.base:
                raise ValueError(f"cost {metric!r} has no base value (base: {sorted(self.base)})")
            if [len(r) for r in rows] != sizes or not all(math.isfinite(v) for r in rows for v in r):
                raise ValueError(f"cost {metric!r}: give one finite value per rule and choice {sizes}")

    def drop(self, picks: Sequence[int]) -> float:
        """The summed drop of one choice index per rule."""
        return sum(row[i] for row, i in zip(self.drops, picks, strict=True))

    def predicted(self, picks: Sequence[int]) -> dict[str, float]:
        """Each cost metric's predicted value for one choice index per rule."""
        return {m: self.base[m] + sum(row[i] for row, i in zip(rows, picks, strict=True))
                for m, rows in self.costs.items()}


@dataclass(frozen=True)
class Solution:
    """One solution: the choice index per rule, its summed drop and predicted costs."""

    picks: tuple[int, ...]
    drop: float
    predicted: dict[str, float]


def solve(problem: Problem, limits: Mapping[str, float], *, k: int = 3, min_diff: int = 2,
          exact: Callable[[tuple[int, ...]], Mapping[str, float]] | None = None,
          max_checks: int = 20) -> list[Solution]:
    """The ``k`` best solutions of ``problem`` under ``limits``, each differing from every earlier
    one in at least ``min_diff`` rule choices.

    Minimises the summed drop subject to ``base + Σ cost <= limit`` for every limited metric,
    exactly (``scipy.optimize.milp``, HiGHS, zero gap); among solutions with the same drop, the
    one with the most headroom (the least summed cost, each metric relative to its limit) wins.
    After each solution a no-good cut (its chosen variables sum to at most ``R - min_diff``)
    makes the next one differ from it.

    Costs do not add up exactly (pruning one rule shrinks the next rule's inputs, whose bytes
    depend on that rule's bits), so with ``exact`` each solution is costed as a whole
    (``exact(picks)`` -> metric -> value) and one that misses a limit is cut off alone (its
    variables sum to at most ``R - 1``) and the next best is tried, up to ``max_checks`` times.

    Returns:
        Up to ``k`` solutions, best first, with their ``exact`` costs where given; fewer when no
        more feasible ones exist (none: the limits cannot be met by any combination) or the
        checks ran out.

    Raises:
        ValueError: a limited metric the problem has no costs for; ``k`` or ``min_diff`` below 1.
        RuntimeError: the solver stopped without an answer (not infeasibility).

    Example:
        >>> p = Problem(("a", "b"), [[8, 4], [8, 4]], [[0.0, 1.0], [0.0, 3.0]],
        ...             {"size_mb": [[0.0, -1.0], [0.0, -1.0]]}, {"size_mb": 4.0})
        >>> [s.picks for s in solve(p, {"size_mb": 3.0}, k=2, min_diff=1)]
        [(1, 0), (0, 1)]
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    missing = sorted(set(limits) - set(problem.costs))
    if missing:
        raise ValueError(f"limits on {missing}, but the problem has costs only for {sorted(problem.costs)}")
    if k < 1 or min_diff < 1:
        raise ValueError(f"k and min_diff must be >= 1, got k={k}, min_diff={min_diff}")
    sizes = [len(c) for c in problem.choices]
    offsets = np.cumsum([0, *sizes])
    n, rules = int(offsets[-1]), len(sizes)
    drop = np.concatenate([np.asarray(r, float) for r in problem.drops])
    rows, lower, upper = [], [], []
    for r in range(rules):  # one choice per rule
        row = np.zeros(n)
        row[offsets[r]:offsets[r + 1]] = 1.0
        rows.append(row)
        lower.append(1.0)
        upper.append(1.0)
    headroom = np.zeros(n)
    for metric, limit in limits.items():
        cost = np.concatenate([np.asarray(r, float) for r in problem.costs[metric]])
        rows.append(cost)
        lower.append(-np.inf)
        upper.append(float(limit) - problem.base[metric])
        headroom += cost / max(abs(float(limit)), 1e-12)
    found: list[Solution] = []
    checks = 0
    options = {"mip_rel_gap": 0.0, "disp": False}
    integrality = np.ones(n)
    while len(found) < k:
        a, lb, ub = np.array(rows), np.array(lower), np.array(upper)
        res = milp(drop, integrality=integrality, bounds=Bounds(0, 1),
                   constraints=LinearConstraint(a, lb, ub), options=options)
        if res.status == 2:  # infeasible: no (more) solutions
            break
        if res.x is None:
            raise RuntimeError(f"the solver stopped without an answer: {res.message}")
        best = float(res.fun)
        x = res.x
        if headroom.any():  # among the solutions with this drop, the cheapest
            tie = LinearConstraint(np.vstack([a, drop]), np.append(lb, -np.inf),
                                   np.append(ub, best + 1e-7 + 1e-9 * abs(best)))
            again = milp(headroom, integrality=integrality, bounds=Bounds(0, 1), constraints=tie, options=options)
            if again.x is not None:
                x = again.x
        picks = tuple(int(np.argmax(x[offsets[r]:offsets[r + 1]])) for r in range(rules))
        predicted = problem.predicted(picks)
        ok = True
        if exact is not None:
            checks += 1
            predicted = {**predicted, **{m: float(v) for m, v in exact(picks).items()}}
            ok = all(predicted[m] <= v + 1e-9 * max(1.0, abs(v)) for m, v in limits.items())
        if ok:
            found.append(Solution(picks, problem.drop(picks), predicted))
        cut = np.zeros(n)
        for r, i in enumerate(picks):
            cut[offsets[r] + i] = 1.0
        rows.append(cut)
        lower.append(-np.inf)
        upper.append(float(rules - (min_diff if ok else 1)))
        if not ok and checks >= max_checks:
            break
    return found


def solve_shifted(problem: Problem, limits: Mapping[str, float], *, k: int = 3, min_diff: int = 2,
                  exact: Callable[[tuple[int, ...]], Mapping[str, float]], rounds: int = 3,
                  max_checks: int = 20) -> tuple[list[Solution], dict[str, float]]:
    """:func:`solve` with whole-solution costs, re-solved when the additive costs are optimistic.

    :func:`solve` cuts off a solution whose whole cost misses a limit and tries the next best,
    which sits at the same additive boundary: where the additive costs read low for every
    solution near it (a ResNet-18's latency table summed 2.85 ms for combinations costed 3.13 ms
    as a whole), its checks are spent on near-twins (4 and 8 bits of one rule cost the same
    latency) and it finds nothing. Here each miss (whole cost minus additive cost) is recorded,
    and while fewer than ``k`` solutions were found, the problem is solved again with its
    ``base`` raised by the median miss of the last round (misses add up over rounds), up to
    ``rounds`` re-solves; the attempt with the most solutions (the first among equals) is kept.
    Every solution returned still meets ``limits`` by its whole cost.

    Returns:
        ``(solutions, shift)``: the solutions as :func:`solve` gives them and the shift of the
        kept attempt's base, metric -> value (``{}`` when the first solve was kept).
    """
    import statistics

    misses: dict[str, list[float]] = {}
    current: Problem = problem

    def checked(picks: tuple[int, ...]) -> Mapping[str, float]:
        got = exact(picks)
        additive = current.predicted(picks)
        for m, v in limits.items():
            if float(got[m]) > v and float(got[m]) > additive[m]:
                misses.setdefault(m, []).append(float(got[m]) - additive[m])
        return got

    shift: dict[str, float] = {}
    best = (solve(current, limits, k=k, min_diff=min_diff, exact=checked, max_checks=max_checks), {})
    for _ in range(rounds):
        if len(best[0]) >= k or not misses:
            break
        for m, values in misses.items():
            shift[m] = shift.get(m, 0.0) + statistics.median(values)
        misses.clear()
        current = Problem(problem.labels, problem.choices, problem.drops, problem.costs,
                          {m: v + shift.get(m, 0.0) for m, v in problem.base.items()})
        found = solve(current, limits, k=k, min_diff=min_diff, exact=checked, max_checks=max_checks)
        if len(found) > len(best[0]):
            best = (found, dict(shift))
    return best


# --------------------------------------------------------------------------------------------
# the space's choices, and candidates from them
# --------------------------------------------------------------------------------------------


def _values(spec: Any, kind: str) -> list[Any]:
    """The discrete values of a ``bits`` or ``prune`` knob; a continuous range gets a grid."""
    from autoshrink.space import Range

    if isinstance(spec, Range):
        values = spec.values()
        if values is None:  # continuous: every CONTINUOUS_STEP from low, and high
            n = int(math.floor((spec.high - spec.low) / CONTINUOUS_STEP + 1e-9))
            values = [spec.low + i * CONTINUOUS_STEP for i in range(n + 1)] + [spec.high]
    elif isinstance(spec, list):
        values = list(spec)
    else:
        values = [spec]
    cast = int if kind == "bits" else (lambda v: round(float(v), 10))
    return list(dict.fromkeys(cast(v) for v in values))


def _rule_specs(space: SearchSpace) -> dict[int, dict[str, Any]]:
    """Rule index -> {"bits": spec, "prune": spec} for the knobs the rule sets (the one walker)."""
    specs: dict[int, dict[str, Any]] = {}
    for knob in space.knobs():
        m = _RULE_KNOB.match(knob.where)
        if m:
            specs.setdefault(int(m.group(1)), {}).setdefault(knob.field, knob.spec)
    return specs


def rule_choices(space: SearchSpace) -> list[tuple[str, list[Choice]]]:
    """Each rule's label and its discrete choices (bits × pruning ratios) in the space.

    Read through :meth:`SearchSpace.knobs`; a rule without a ``bits`` (``prune``) knob has
    ``bits=None`` (``prune=None``) in its choices: its layers keep what the space gives them.

    Example:
        >>> from autoshrink.space import SearchSpace
        >>> space = SearchSpace.from_dict({"layers": [{"name": "a", "pattern": "*", "bits": [8, 32],
        ...     "prune": {"low": 0.0, "high": 0.25, "step": 0.25}}]})
        >>> [c.describe() for c in rule_choices(space)[0][1]]
        ['8b/p0', '8b/p0.25', '32b/p0', '32b/p0.25']
    """
    specs = _rule_specs(space)
    out = []
    for i, rule in enumerate(space.rules()):
        own = specs.get(i, {})
        bits = _values(own["bits"], "bits") if "bits" in own else [None]
        prune = _values(own["prune"], "prune") if "prune" in own else [None]
        out.append((rule.label, [Choice(b, p) for b, p in product(bits, prune)]))
    return out


def reference_choice(choices: Sequence[Choice]) -> Choice:
    """The setting a rule's costs are measured from: 8 bits where the rule offers them (else 32,
    else its lowest), unpruned (for the knobs it sets).

    Costs are linear only near where they are taken. A budget that binds sits near all-int8,
    and there the one thing that does not add up is the quantize/dequantize pair around a layer
    kept fp32 among int8 neighbours: measured from an all-fp32 reference, each rule's int8
    choice paid for two transitions that disappear once its neighbours are int8 too, so the sum
    overestimated every mostly-int8 candidate (on the tiny CNN, 0.45 ms predicted for a
    candidate whose whole prediction is 0.44 ms: a binding budget looked infeasible).
    """
    first = choices[0]
    bits = None
    if first.bits is not None:
        offered = {c.bits for c in choices if c.bits is not None}
        bits = 8 if 8 in offered else 32 if 32 in offered else min(offered)
    return Choice(bits, None if first.prune is None else 0.0)


def to_candidate(space: SearchSpace, picks: Mapping[str, Choice], base: Candidate | None = None) -> Candidate:
    """The candidate that sets each rule (by label) to its choice in ``picks``, keyed as
    :meth:`SearchSpace.sample` keys it; every other field (defaults, distillation, fine-tune,
    ``round_to``) from ``base`` (default: the space's own first choices, as the baselines use).

    Raises:
        KeyError: a rule of the space missing from ``picks``.
    """
    from autoshrink.search.baselines import space_defaults

    base = base or space_defaults(space)
    labels = [r.label for r in space.rules()]
    bits: dict[str, int] = {}
    prune: dict[str, float] = {}
    for knob in space.knobs():
        m = _RULE_KNOB.match(knob.where)
        if not m:
            continue
        choice = picks[labels[int(m.group(1))]]
        if knob.field == "bits" and choice.bits is not None:
            bits[knob.key] = choice.bits
        elif knob.field == "prune" and choice.prune is not None:
            prune[knob.key] = choice.prune
    return dataclasses.replace(base, bits=bits, prune=prune)


# --------------------------------------------------------------------------------------------
# the measurements
# --------------------------------------------------------------------------------------------


def _teacher_digest(model: Any) -> str:
    import torch

    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().flatten()
            h.update(str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def sensitivity_table(task: Task, space: SearchSpace, *, limit: int = DEFAULT_LIMIT,
                      progress: bool = False) -> tuple[pd.DataFrame, bool]:
    """Each rule's accuracy drop at each of its bit-widths and pruning ratios, alone and without
    fine-tune (:func:`autoshrink.sensitivity.sensitivity`, ``by="rule"``), on the first ``limit``
    validation samples; only the settings each rule can take are measured.

    Cached as CSV under ``AUTOSHRINK_CACHE/sensitivity/``, keyed by a hash of the teacher's
    weights, the space's fingerprint, the task's name and ``limit``.

    Returns:
        The table (columns of :data:`autoshrink.sensitivity.COLUMNS`) and whether it came from
        the cache.
    """
    import pandas as pd

    from autoshrink._env import cache_dir
    from autoshrink.sensitivity import COLUMNS, sensitivity

    text = f"{_CACHE_VERSION}|{_teacher_digest(task.model)}|{space.fingerprint()}|{task.name}|{limit}"
    path = cache_dir() / "sensitivity" / f"{hashlib.sha256(text.encode()).hexdigest()[:20]}.csv"
    if path.is_file():
        return pd.read_csv(path), True
    groups: dict[tuple[tuple[int, ...], tuple[float, ...]], list[str]] = {}
    for label, choices in rule_choices(space):
        bits = tuple(sorted({c.bits for c in choices if c.bits is not None and c.bits < 32}))
        ratios = tuple(sorted({c.prune for c in choices if c.prune is not None and c.prune > 0}))
        if bits or ratios:  # rules measured at the same settings share one sweep
            groups.setdefault((bits, ratios), []).extend(glob.escape(n) for n in space.bound_layers(label))
    frames = [sensitivity(task, by="rule", space=space, bits=bits, prune=ratios, layers=layers, limit=limit,
                          progress=progress)
              for (bits, ratios), layers in groups.items()]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))
    from autoshrink._files import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return df, False


def _drops(df: pd.DataFrame) -> tuple[dict[tuple[str, str, float], float], set[tuple[str, str, float]]]:
    """(rule, kind, value) -> drop for the measurements that gave a number, and every
    (rule, kind, value) measured at all (a failed one has a NaN drop)."""
    out, seen = {}, set()
    for label, kind, value, drop in zip(df["layer"], df["kind"], df["value"], df["drop"], strict=True):
        key = (str(label), str(kind), round(float(value), 10))
        seen.add(key)
        if drop is not None and math.isfinite(float(drop)):
            out[key] = max(0.0, float(drop))
    return out, seen


@dataclass
class _Pruned:
    """What a :class:`Coster` and its :meth:`~Coster.relaxed` twin share: the pruned copy in hand
    (a ResNet-18 is 45 MB: one at a time, keyed by its pruning ``plan``), what each candidate's
    pruning gives (``memo``), and the metrics that is computed for (the full coster's)."""

    metrics: list[str]
    plan: Any = None
    pruned: Any = None
    memo: dict = field(default_factory=dict)


class Coster:
    """A candidate's latency / size / MACs without compiling it: the teacher pruned by it (one
    pruned copy kept, as bits do not change the pruning), its bits as :func:`compress` resolves
    them, the ``predictor``'s prediction of its layers times ``latency_scale``, and the exact
    size and MACs.

    What a candidate's pruning gives (size, MACs, the :class:`~autoshrink.measure.calibration.Structure`
    the latency table reads) is kept per candidate and shared with :meth:`relaxed`'s coster, so
    a candidate is pruned once however often it is costed; only the latency prediction times
    table entries, and only when asked for.

    Raises:
        ValueError: a latency metric without a ``predictor``.
    """

    def __init__(self, task: Task, metrics: Sequence[str], predictor: Any = None, latency_scale: float = 1.0,
                 deadline: float | None = None) -> None:
        if TrialAttr.LATENCY_MS in metrics and predictor is None:
            raise ValueError("a latency budget needs a latency predictor")
        self.task, self.metrics, self.predictor, self.latency_scale = task, list(metrics), predictor, latency_scale
        self.deadline = deadline  # time.monotonic() past which a costing raises SolverTimeout
        self._shared = _Pruned(list(metrics))  # shared with relaxed()

    def relaxed(self) -> Coster:
        """This coster without the latency metric (no table entry is timed), sharing what is
        pruned and counted, so that costing a candidate again with latency prunes nothing twice."""
        other = Coster(self.task, [m for m in self.metrics if m != TrialAttr.LATENCY_MS], self.predictor,
                       self.latency_scale, self.deadline)
        other._shared = self._shared
        return other

    def __call__(self, cand: Candidate) -> dict[str, float]:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise SolverTimeout
        if not self.metrics:
            return {}
        memo = self._shared.memo
        if cand not in memo:
            memo[cand] = self._measure(cand)
        got = memo[cand]
        out = {m: got[m] for m in self.metrics if m != TrialAttr.LATENCY_MS}
        if TrialAttr.LATENCY_MS in self.metrics:
            out[TrialAttr.LATENCY_MS] = self.latency_scale * float(self.predictor.predict_structure(got["structure"]))
        return {m: out[m] for m in self.metrics}

    def _measure(self, cand: Candidate) -> dict[str, Any]:
        """Size, MACs and the latency structure of ``cand`` (whichever the full metrics need)."""
        from autoshrink.compress import compress
        from autoshrink.compress.quantize import layer_bits, unsupported_layers
        from autoshrink.measure.flops import model_cost

        x = self.task.example_input
        shared = self._shared
        plan = (tuple(cand.prune.items()), cand.default_prune, cand.round_to)
        if plan != shared.plan:
            shared.plan, shared.pruned = plan, compress(self.task.model, cand, x).pruned
        pruned = shared.pruned
        fp32 = unsupported_layers(pruned, cand)
        bits = {n: 32 if n in fp32 else b for n, b in layer_bits(pruned, cand).items()}
        got: dict[str, Any] = {}
        if TrialAttr.SIZE_MB in shared.metrics or TrialAttr.MMACS in shared.metrics:
            cost = model_cost(pruned, x, bits)
            got[TrialAttr.SIZE_MB], got[TrialAttr.MMACS] = cost.size_mb, cost.mmacs
        if TrialAttr.LATENCY_MS in shared.metrics:
            got["structure"] = self.predictor.structure(pruned, bits, x)
        return got


def measure_problem(task: Task, space: SearchSpace, coster: Coster, *,
                    limit: int = DEFAULT_LIMIT) -> tuple[Problem, bool]:
    """The knapsack of ``space`` on ``task``: drops from :func:`sensitivity_table`, and for each
    of ``coster``'s metrics (``latency_ms``, ``size_mb``, ``mmacs``) each (rule, choice)'s change
    from the reference, from the teacher compressed with only that rule changed (no compilation).

    A choice whose sensitivity measurement failed is left out of the problem.

    Returns:
        The problem (its choices are :class:`Choice` s) and whether the sensitivity was cached.

    Raises:
        ValueError: a rule all of whose choices failed.
    """
    df, cached = sensitivity_table(task, space, limit=limit)
    # a (rule, setting) never measured costs no accuracy: a rule of only the classifier head has
    # no prune rows, as pruning leaves the head alone
    measured, seen = _drops(df)
    metrics = coster.metrics
    rules = rule_choices(space)
    ref = {label: reference_choice(choices) for label, choices in rules}
    base = coster(to_candidate(space, ref))
    labels, kept, drops = [], [], []
    costs: dict[str, list[list[float]]] = {m: [] for m in metrics}
    for label, choices in rules:
        row_choices, row_drops, row_costs = [], [], {m: [] for m in metrics}
        # by pruning ratio, so that each ratio's pruned teacher is built once for all its bit-widths
        for choice in sorted(choices, key=lambda c: c.prune or 0.0):
            parts = [("bits", choice.bits, 32), ("prune", choice.prune, 0.0)]
            keys = [(label, kind, round(float(v), 10)) for kind, v, none in parts if v is not None and v != none]
            if any(key in seen and key not in measured for key in keys):
                continue  # its measurement failed: a trial would most likely fail too
            got = coster(to_candidate(space, {**ref, label: choice}))
            row_choices.append(choice)
            row_drops.append(sum(measured.get(key, 0.0) for key in keys))
            for m in metrics:
                row_costs[m].append(got[m] - base[m])
        if not row_choices:
            raise ValueError(f"rule {label!r}: every choice failed its sensitivity measurement")
        labels.append(label)
        kept.append(row_choices)
        drops.append(row_drops)
        for m in metrics:
            costs[m].append(row_costs[m])
    return Problem(labels, kept, drops, costs, base), cached


# --------------------------------------------------------------------------------------------
# proposals
# --------------------------------------------------------------------------------------------


def _whole(space: SearchSpace, problem: Problem, coster: Coster,
           base: Candidate | None) -> Callable[[tuple[int, ...]], dict[str, float]]:
    """A solution's costs as a whole candidate (they do not add up exactly: each is checked)."""
    def whole(picks: tuple[int, ...]) -> dict[str, float]:
        return coster(to_candidate(space, {label: problem.choices[r][i]
                                           for r, (label, i) in enumerate(zip(problem.labels, picks, strict=True))},
                                   base))
    return whole


def _solve_latency_last(task: Task, space: SearchSpace, coster: Coster, limits: Mapping[str, float], *, k: int,
                        limit: int, base: Candidate | None):
    """Solve without the latency limit, then check it on the solutions alone.

    The latency table times an entry per new layer shape (seconds each, a first search on a
    machine needs many), while size and MACs are counted exactly in milliseconds. Where the
    solutions of the problem without the latency limit all meet it as whole candidates, they
    are the solutions of the whole problem: each is the best of a larger set, and it is in the
    smaller one (a lazy constraint, as branch-and-cut adds one only when a solution violates
    it). Only their layers are then timed, not every choice's. Where one misses it, the caller
    solves the whole problem; what was pruned and counted here is not done again. One difference:
    among solutions of equal drop, :func:`solve` prefers headroom under the other limits only,
    since the latency of the ones not chosen is not known; under a latency limit that does not
    bind, that headroom matters least.

    Returns:
        ``(problem, solutions, binds, sensitivity_cached, shift)``: ``problem`` without latency
        costs; ``binds`` is True, with no solutions,
        when one missed the latency limit (the whole problem is to be solved); no solutions and
        ``binds`` False when nothing meets the other limits (nor, then, the whole budget).
    """
    relaxed = coster.relaxed()
    others = {m: v for m, v in limits.items() if m != TrialAttr.LATENCY_MS}
    problem, cached = measure_problem(task, space, relaxed, limit=limit)
    solutions, shift = solve_shifted(problem, others, k=k, exact=_whole(space, problem, relaxed, base))
    timed = _whole(space, problem, coster, base)
    checked = []
    for sol in solutions:
        latency = timed(sol.picks)[TrialAttr.LATENCY_MS]
        if latency > limits[TrialAttr.LATENCY_MS] + 1e-9 * max(1.0, abs(limits[TrialAttr.LATENCY_MS])):
            return problem, [], True, cached, {}
        checked.append(Solution(sol.picks, sol.drop, {**sol.predicted, TrialAttr.LATENCY_MS: latency}))
    return problem, checked, False, cached, shift


class SolverTimeout(Exception):
    """The solver ran past its time limit (:func:`propose`'s ``seconds``)."""


def default_seconds() -> float:
    """The solver's time limit: ``AUTOSHRINK_SOLVER_SECONDS``, else 180 s."""
    import os

    text = os.environ.get("AUTOSHRINK_SOLVER_SECONDS", "")
    try:
        return float(text) if text else 180.0
    except ValueError:
        raise ValueError(f"AUTOSHRINK_SOLVER_SECONDS must be a number of seconds, got {text!r}") from None


@dataclass
class Proposals:
    """What :func:`propose` found: candidates to enqueue, and what to record and say."""

    candidates: list[Candidate] = field(default_factory=list)
    solutions: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False
    latency_scale: float = 1.0
    shift: dict[str, float] = field(default_factory=dict)  # :func:`solve_shifted`'s raise of the base
    latency_binds: bool | None = None  # None: no latency limit; False: checked on the solutions alone
    warning: str = ""

    def record(self) -> dict:
        """The study attribute: the proposals with their predicted costs and drops, and the time spent."""
        return {"proposals": self.solutions, "seconds": round(self.seconds, 1), "sensitivity_cached": self.cached,
                "latency_scale": round(self.latency_scale, 4), "shift": {m: round(v, 4) for m, v in self.shift.items()},
                "latency_binds": self.latency_binds, "warning": self.warning}

    def line(self) -> str:
        """One progress line: ``solver: 3 proposals in 41 s (sensitivity cached)``."""
        said = f"solver: {len(self.candidates)} proposal{'s' if len(self.candidates) != 1 else ''} in " \
               f"{self.seconds:.0f} s" + (" (sensitivity cached)" if self.cached else "")
        return f"{said}; {self.warning}" if self.warning else said


def propose(task: Task, space: SearchSpace, budget: Budget, *, k: int = 3, limit: int = DEFAULT_LIMIT,
            latency_threads: int = 1, runtime: str = "inductor", anchors: Sequence[tuple[Candidate, float]] = (),
            base: Candidate | None = None, seconds: float | None = None) -> Proposals:
    """Up to ``k`` candidates that minimise the summed no-fine-tune drop under ``budget``'s
    predicted latency / size / MACs, differing pairwise in at least two rule choices. The
    knapsack's costs add up per rule; each solution is then costed as a whole candidate (exact
    size and MACs, the latency table over its real layer shapes) and one that misses the budget
    is replaced by the next best (:func:`solve`'s ``exact``); where the summed costs read low for
    all of them, the knapsack is solved again with its base raised by the miss
    (:func:`solve_shifted`). A latency limit is added only where it binds: the problem is
    first solved without it, and where its solutions all meet it by prediction they are kept,
    having timed only their own layers (:func:`_solve_latency_last`; recorded as
    ``latency_binds``).

    Args:
        task: the teacher and its data.
        space: the space, bound to the model.
        budget: the limits (at least one).
        k: how many proposals.
        limit: validation samples the sensitivity is measured on.
        latency_threads, runtime: the latency table's (as the search's).
        anchors: (candidate, measured latency ms) pairs, e.g. the budget-edge probes: the
            predicted latencies are scaled by the median of measured / predicted over them, so the
            table's bias does not move the budget line.
        base: the fields the proposals share beyond bits and pruning (default: the space's
            first choices, as the baselines use).
        seconds: the time limit (default :func:`default_seconds`). The first search on a machine
            times the latency table's new entries (a few seconds each, many for a large model at
            several pruning ratios); past the limit it stops with no proposals and a warning, and
            the entries timed so far stay in the machine's table, so the next search goes on from
            there.

    Returns:
        :class:`Proposals`; never raises for a failure of its own: an infeasible problem gives no
        candidates and a ``warning``, any error gives no candidates and a ``warning`` naming it.
    """
    start = time.perf_counter()
    t0 = time.monotonic()
    found = Proposals()
    limit_s = 0.0
    try:
        limit_s = default_seconds() if seconds is None else seconds
        limits = {m: v for m, v in budget.constraints().items() if m in METRICS}
        if not limits:
            found.warning = "no budget to solve for"
            return found
        predictor = None
        if TrialAttr.LATENCY_MS in limits:
            from autoshrink.measure.predictor import LatencyPredictor

            predictor = LatencyPredictor.for_machine(threads=latency_threads, runtime=runtime)
            ratios = [ms / predictor.predict(task.model, cand, task.example_input) for cand, ms in anchors if ms]
            if ratios:
                found.latency_scale = float(sorted(ratios)[len(ratios) // 2])
        coster = Coster(task, list(limits), predictor, found.latency_scale, deadline=t0 + limit_s)
        solutions: list[Solution] = []
        cached = None
        if predictor is not None:  # the latency limit as a lazy constraint: see _solve_latency_last
            problem, solutions, found.latency_binds, cached, found.shift = _solve_latency_last(
                task, space, coster, limits, k=k, limit=limit, base=base)
        if predictor is None or found.latency_binds:
            problem, again = measure_problem(task, space, coster, limit=limit)
            cached = again if cached is None else cached  # (the first measure_problem filled the cache)
            solutions, found.shift = solve_shifted(problem, limits, k=k, exact=_whole(space, problem, coster, base))
        found.cached = bool(cached)
        if not solutions:
            found.warning = (f"no combination of the rules' choices meets {budget.describe()} by prediction; "
                             "no proposals")
        for sol in solutions:
            picks = {label: problem.choices[r][i] for r, (label, i) in enumerate(zip(problem.labels, sol.picks,
                                                                                     strict=True))}
            found.candidates.append(to_candidate(space, picks, base))
            found.solutions.append({"choices": {label: c.describe() for label, c in picks.items()},
                                    "drop": round(sol.drop, 4),
                                    "predicted": {m: round(v, 4) for m, v in sol.predicted.items()}})
    except SolverTimeout:
        found.candidates, found.solutions = [], []
        found.warning = (f"the solver ran past its {limit_s:g} s (AUTOSHRINK_SOLVER_SECONDS) while timing new "
                         "latency-table entries; no proposals this time (the entries timed are kept: the next "
                         "search on this machine goes on from them)")
    except Exception as exc:  # noqa: BLE001 - proposals are an aid: the search goes on without them
        found.candidates, found.solutions = [], []
        found.warning = f"the solver failed ({type(exc).__name__}: {str(exc)[:300]}); no proposals"
    found.seconds = time.perf_counter() - start
    return found

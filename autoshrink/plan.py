"""`plan(task, space, budget)`: what a search would do, found in seconds and without training.

A plan binds the space to the model (each rule and the layers it matched), lists the
dependency groups pruning acts on with their channel ranges, the layers that stay unpruned or
fp32 and why, and the cheapest candidate of the space (lowest bits, most pruning) as it would
really be deployed: compressed, lowered, compiled and timed. Every error in the space against
the model (a pattern that matches no layer, an empty ``layers: []``, pruning asked of layers
that are never pruned) is raised here, before a teacher trains or a worker starts.

Example:
    >>> import autoshrink as ash
    >>> task = ash.tasks.get("digits-resnet20")                # doctest: +SKIP
    >>> print(render(plan(task, None, ash.Budget(latency_ms=2))))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from autoshrink.budget import Budget
from autoshrink.candidate import Candidate
from autoshrink.compress.quantize import unsupported_layers
from autoshrink.record import TrialAttr
from autoshrink.space import SearchSpace, SpaceError
from autoshrink.space.auto import ModelGraph, analyze, auto_space, model_name
from autoshrink.task import Task

__all__ = ["GroupPlan", "Plan", "RulePlan", "cheapest_candidate", "default_space_for", "plan", "render"]

#: Zoo models whose bundled space is the default; every other model gets :func:`auto_space`.
BUNDLED_DEFAULT = ("resnet18_32",)
PLAN_LATENCY_RUNS = 10


@dataclass(frozen=True)
class RulePlan:
    """One rule of the space and the layers it took (first match wins)."""

    label: str
    pattern: str
    bits: Any
    prune: Any
    layers: tuple[str, ...]


@dataclass(frozen=True)
class GroupPlan:
    """A dependency group: the ratio of ``root``'s rule prunes every member's output channels."""

    root: str
    layers: tuple[str, ...]
    channels: int
    rule: str | None  # the rule that sets the root's ratio (None: defaults)
    kept_min: int  # channels kept at the rule's highest ratio (about: rounding is torch-pruning's)
    kept_max: int  # ... and at its lowest


@dataclass(frozen=True)
class Plan:
    """What a search of ``space`` on a model would do (see :func:`plan`).

    Attributes:
        model: the model's name.
        space: the space, bound to the model.
        rules: each rule and the layers it matched.
        defaults: layers no rule matched (they take the space's ``defaults``).
        groups: the prunable dependency groups and the channels each can keep.
        unpruned: layers pruning never touches, and why.
        fp32: layers that stay fp32 whatever the candidate says, and why.
        sampled: the parameters the search samples.
        teacher: the teacher's ``params``, ``mmacs``, ``size_mb`` (fp32).
        cheapest: the space's cheapest candidate.
        cheapest_cost: its ``params``, ``mmacs``, ``size_mb``, ``latency_ms`` (None when not
            timed), as deployed.
        cheapest_error: why the cheapest candidate could not be built or timed ("" if it was).
        meets_budget: whether the cheapest candidate meets ``budget`` (None: not known).
        budget: the budget the plan was made for.
        seconds: how long planning took.
        unpruned_groups: the dependency groups pruning leaves whole, as ``(layers, reason)``:
            what the cheapest candidate's pruning reported (as a trial's ``PruneReport`` will),
            else what the graph analysis found.
    """

    model: str
    space: SearchSpace
    rules: tuple[RulePlan, ...]
    defaults: tuple[str, ...]
    groups: tuple[GroupPlan, ...]
    unpruned: Mapping[str, str]
    fp32: Mapping[str, str]
    sampled: tuple[str, ...]
    teacher: Mapping[str, float]
    cheapest: Candidate
    cheapest_cost: Mapping[str, float | None] = field(default_factory=dict)
    cheapest_error: str = ""
    meets_budget: bool | None = None
    budget: Budget = field(default_factory=Budget)
    seconds: float = 0.0
    unpruned_groups: tuple[tuple[tuple[str, ...], str], ...] = ()

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "space": self.space.source,
            "rules": [{"rule": r.label, "pattern": r.pattern, "layers": list(r.layers)} for r in self.rules],
            "defaults": list(self.defaults),
            "groups": [{"root": g.root, "layers": list(g.layers), "channels": g.channels, "rule": g.rule,
                        "kept_min": g.kept_min, "kept_max": g.kept_max} for g in self.groups],
            "unpruned": dict(self.unpruned),
            "fp32": dict(self.fp32),
            "sampled": list(self.sampled),
            "teacher": dict(self.teacher),
            "cheapest": self.cheapest.to_dict(),
            "cheapest_cost": dict(self.cheapest_cost),
            "cheapest_error": self.cheapest_error,
            "meets_budget": self.meets_budget,
            "budget": self.budget.constraints(),
            "seconds": self.seconds,
            TrialAttr.UNPRUNED_GROUPS: [{"layers": list(g), "reason": why} for g, why in self.unpruned_groups],
        }


def default_space_for(model: nn.Module, example_input: Any, graph: ModelGraph | None = None) -> SearchSpace:
    """The space a search uses when none is given: the bundled ``default.yaml`` for the models it
    was written for (:data:`BUNDLED_DEFAULT`), else one derived from the model's graph."""
    if model_name(model) in BUNDLED_DEFAULT:
        return SearchSpace.default()
    return auto_space(model, example_input, graph=graph)


def cheapest_candidate(space: SearchSpace) -> Candidate:
    """The space's smallest, lightest configuration (:meth:`SearchSpace.cheapest`)."""
    return space.cheapest()


def _resolve(space: SearchSpace | str | Any | None, model: nn.Module, x: Any, graph: ModelGraph) -> SearchSpace:
    if space is None or space == "auto":
        return default_space_for(model, x, graph) if space is None else auto_space(model, x, graph=graph)
    if isinstance(space, SearchSpace):
        return space
    return SearchSpace.from_yaml(space)


def check_space(model: nn.Module, example_input: Any, space: SearchSpace | str | None = None) -> SearchSpace:
    """The checks :func:`plan` makes on a space, in seconds and without compressing anything:
    ``space`` resolved (None: the search's default; ``"auto"``; a YAML path) and bound to
    ``model``'s layers. A search runs this before it trains or compresses anything.

    Returns:
        The space, bound to the model's layers.

    Raises:
        SpaceError: as :func:`plan`.
    """
    model.eval()
    graph = analyze(model, example_input)
    return _checked(space, model, example_input, graph)[1]


def _checked(space, model: nn.Module, x: Any, graph: ModelGraph):
    from autoshrink.compress.quantize import quantizable_layers

    space = _resolve(space, model, x, graph)
    if not space.rules():
        raise SpaceError(
            f"{space.source}: layers: the space has no layer rules, so nothing per layer would be "
            "searched (every layer takes `defaults`); add rules, or use `--space auto` for rules "
            "derived from the model"
        )
    bound = space.bind(quantizable_layers(model))  # raises SpaceError naming the rule that matches nothing
    rules = tuple(
        RulePlan(r.label, r.pattern, r.bits, r.prune, tuple(bound.bound_layers(r.label)))
        for r in bound.rules()
    )
    # why layers are never pruned, then a rule that asks pruning only of such layers is an error
    unpruned = dict(graph.unprunable)
    for i, rule in enumerate(bound.rules()):
        lo, hi = _knob_range(rule.prune)
        layers = rules[i].layers
        if hi > 0 and layers and all(n in unpruned for n in layers):
            raise SpaceError(
                f"{space.source}: layers[{i}].prune: {rule.label!r} asks to prune {list(layers)[:4]}, "
                f"which are never pruned ({unpruned[layers[0]]}); remove its prune key"
            )
    return space, bound, rules, unpruned


def _knob_range(knob: Any) -> tuple[float, float]:
    if knob is None:
        return 0.0, 0.0
    if hasattr(knob, "low"):  # a Range
        return float(knob.low), float(knob.high)
    if isinstance(knob, dict):
        return float(knob["low"]), float(knob["high"])
    if isinstance(knob, list):
        return float(min(knob)), float(max(knob))
    return float(knob), float(knob)


def _kept(channels: int, ratio: float, round_to: int | None) -> int:
    keep = channels - math.floor(channels * ratio)
    step = round_to or 1
    return max(step, keep - keep % step) if channels > step else channels


def _rule_of(name: str, rules: Iterable[RulePlan]) -> RulePlan | None:
    return next((r for r in rules if name in r.layers), None)


def plan(
    task_or_model: Task | nn.Module,
    space: SearchSpace | str | None = None,
    budget: Budget | None = None,
    *,
    example_input: Any = None,
    measure: bool = True,
    latency_runs: int = PLAN_LATENCY_RUNS,
    calibration: Iterable[Any] | None = None,
    runtime: str = "inductor",
) -> Plan:
    """What a search of ``space`` would do on the model, without training.

    Args:
        task_or_model: a :class:`Task`, or a model (then ``example_input`` is required).
        space: a :class:`SearchSpace`, a YAML path, ``"auto"`` (derived from the model), or None
            for the search's default (:func:`default_space_for`).
        budget: the limits the cheapest candidate is checked against.
        example_input: one batch (a tensor or a dict of tensors); default the task's.
        measure: compile and time the cheapest candidate (a few seconds); False skips latency.
        latency_runs: timed calls for the cheapest candidate's latency (few: this is a preview).
        calibration: batches for the quantization observers (default: the task's training
            inputs, or the example input).
        runtime: the deployment runtime the cheapest candidate is timed in; a layer it runs with
            a float kernel although quantized is listed among the fp32 layers, with why.

    Returns:
        A frozen :class:`Plan`.

    Raises:
        SpaceError: a rule whose pattern matches no layer (or only layers an earlier rule took),
            a space with no layer rules, or pruning asked only of layers that are never pruned.
        ValueError: a model without ``example_input``.

    Example:
        >>> import torch
        >>> m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 9, 2))
        >>> p = plan(m, "auto", example_input=torch.randn(1, 1, 5, 5), measure=False)
        >>> [r.label for r in p.rules]
        ['stem', 'head']
    """
    from autoshrink.compress import compress
    from autoshrink.compress.quantize import quantizable_layers
    from autoshrink.measure.flops import model_cost

    started = time.perf_counter()
    if measure:
        from autoshrink.runtimes import get as get_runtime

        get_runtime(runtime)  # an unknown or missing runtime: one line, before any work
    budget = budget or Budget()
    if isinstance(task_or_model, Task):
        task: Task | None = task_or_model
        model = task.model
        x = task.example_input if example_input is None else example_input
    elif isinstance(task_or_model, nn.Module):
        task, model, x = None, task_or_model, example_input
        if x is None:
            raise ValueError("plan(model, ...) needs example_input= (one batch the model accepts)")
    else:
        raise TypeError(f"plan() takes a Task or an nn.Module, got {type(task_or_model).__name__}")
    model.eval()
    graph = analyze(model, x)
    space, bound, rules, unpruned = _checked(space, model, x, graph)
    names = quantizable_layers(model)
    taken = {n for r in rules for n in r.layers}
    defaults = tuple(n for n in names if n not in taken)

    spec = space.to_dict()
    round_to = spec.get("round_to")
    round_to = (None if None in round_to else min(round_to)) if isinstance(round_to, list) else round_to
    groups = []
    default_prune = spec["defaults"]["prune"]
    for g in graph.groups:
        rule = _rule_of(g.root, rules)
        lo, hi = _knob_range(rule.prune) if rule is not None else (default_prune, default_prune)
        if rule is not None and rule.prune is None:
            lo = hi = default_prune
        groups.append(GroupPlan(g.root, tuple(n for n in graph.order if n in g.layers), g.channels,
                                rule.label if rule else None, _kept(g.channels, hi, round_to),
                                _kept(g.channels, lo, round_to)))
        if hi == 0:
            for n in g.layers:
                unpruned.setdefault(n, f"its group's rule ({rule.label if rule else 'defaults'}) never prunes")

    cheapest = cheapest_candidate(space)
    # whatever bits a candidate asks, these stay fp32 (asked at 8 bits, every one is named)
    fp32 = dict(unsupported_layers(model, Candidate.uniform(bits=8)))
    for r, rule in zip(rules, bound.rules(), strict=True):
        bits = rule.bits if isinstance(rule.bits, list) else [rule.bits] if rule.bits is not None else []
        if bits and min(bits) == 32:
            for n in r.layers:
                fp32.setdefault(n, f"rule {r.label!r} allows only 32 bits")
    if spec["defaults"]["bits"] == 32:
        for n in defaults:
            fp32.setdefault(n, "no rule matches it and defaults.bits is 32")

    teacher_cost = model_cost(model, x, {})
    teacher = {"params": teacher_cost.params, "mmacs": teacher_cost.mmacs, "size_mb": teacher_cost.size_mb}
    cost: dict[str, float | None] = {}
    error = ""
    unpruned_groups = tuple(graph.unpruned_groups)
    try:
        comp = compress(model, cheapest, x)
        if any(change.requested > 0 for change in comp.prune_report.layers):  # it pruned as a trial will
            unpruned_groups = tuple(comp.prune_report.unpruned_groups)
            for g, why in unpruned_groups:
                for n in g:
                    unpruned.setdefault(n, why)
        c = model_cost(comp.pruned, x, comp.bits)
        cost = {"params": c.params, "mmacs": c.mmacs, "size_mb": c.size_mb, "latency_ms": None}
        for n, why in comp.fp32_layers.items():
            fp32.setdefault(n, why)
        if measure:
            cost["latency_ms"], in_runtime = _time_cheapest(comp, x, task, calibration, latency_runs, runtime)
            for n, why in {**comp.fp32_layers, **in_runtime}.items():
                fp32.setdefault(n, why)
    except Exception as exc:  # the trials would meet the same failure: show it, don't stop the plan
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        error = f"{type(exc).__name__}: {first[:300]}"
    met = None
    if cost:
        known = {k: v for k, v in cost.items() if v is not None}
        missing = [k for k in budget.constraints() if k not in known]
        met = False if budget.violations(known) else (None if missing else True)
    return Plan(
        model=model_name(model), space=bound, rules=rules, defaults=defaults, groups=tuple(groups),
        unpruned=unpruned, fp32=fp32, sampled=tuple(bound.param_names()), teacher=teacher,
        cheapest=cheapest, cheapest_cost=cost, cheapest_error=error, meets_budget=met, budget=budget,
        seconds=time.perf_counter() - started, unpruned_groups=unpruned_groups,
    )


def _time_cheapest(comp, x: Any, task: Task | None, calibration, runs: int,
                   runtime: str = "inductor") -> tuple[float, dict[str, str]]:
    """The cheapest candidate's latency in ``runtime``, and the layers that runtime runs in float."""
    from autoshrink.compress.quantize import compile_cpu, lower, prepare_ptq
    from autoshrink.measure.latency import measure_latency
    from autoshrink.runtimes import fp32_in_runtime, time_runtime
    from autoshrink.runtimes import get as get_runtime

    if calibration is None:
        calibration = list(task.calibration_batches(n=2)) if task is not None else [x]
    ptq = prepare_ptq(comp.pruned, Candidate(bits=comp.bits, default_bits=32), x, list(calibration))
    comp.verify(ptq)
    lowered = lower(ptq)
    if runtime != "inductor":
        dep = get_runtime(runtime).build(lowered, x, threads=1)
        return time_runtime(dep, x, runs=runs, warmup=2).median_ms, fp32_in_runtime(dep, comp.bits)
    lat = measure_latency(compile_cpu(lowered), x, runs=runs, warmup=2, threads=1)
    return lat.median_ms, {}


# -- rendering --------------------------------------------------------------------------------------
def _short(names: Iterable[str], n: int = 4) -> str:
    names = list(names)
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _knob(k: Any) -> str:
    if k is None:
        return "-"
    if isinstance(k, dict):
        return f"{k['low']:g}..{k['high']:g}" + (f" step {k['step']:g}" if k.get("step") else "")
    if hasattr(k, "low"):
        return f"{k.low:g}..{k.high:g}" + (f" step {k.step:g}" if k.step else "")
    return str(k)


def render(p: Plan, *, width: int = 120) -> str:
    """The plan as text for a terminal (rich tables, no colour codes)."""
    import io

    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    con = Console(file=buf, width=width, no_color=True, highlight=False)
    con.print(f"plan: {p.model} with space {p.space.source} ({len(p.sampled)} sampled parameters)")

    rules = Table(title="rules (first match wins)", title_justify="left")
    for col in ("rule", "pattern", "bits", "prune", "layers"):
        rules.add_column(col)
    for r in p.rules:
        rules.add_row(r.label, r.pattern, _knob(r.bits), _knob(r.prune), f"{len(r.layers)}: {_short(r.layers)}")
    if p.defaults:
        d = p.space.to_dict()["defaults"]
        rules.add_row("(defaults)", "-", str(d["bits"]), f"{d['prune']:g}", f"{len(p.defaults)}: {_short(p.defaults)}")
    con.print(rules)

    if p.groups:
        groups = Table(title="prunable groups (one ratio, the same channels removed)", title_justify="left")
        for col in ("root", "rule", "channels", "kept (about)", "members"):
            groups.add_column(col)
        for g in p.groups:
            kept = f"{g.kept_min}..{g.kept_max}" if g.kept_min != g.kept_max else str(g.kept_min)
            groups.add_row(g.root, g.rule or "(defaults)", str(g.channels), kept, _short(g.layers, 3))
        con.print(groups)
    for g, why in p.unpruned_groups:
        con.print(f"group {_short(g, 6)}: {why}")
    kept = Table(title="left alone, and why", title_justify="left")
    for col in ("layer", "unpruned", "fp32"):
        kept.add_column(col)
    for n in dict.fromkeys([*p.unpruned, *p.fp32]):
        kept.add_row(n, p.unpruned.get(n, ""), p.fp32.get(n, ""))
    if kept.row_count:
        con.print(kept)

    t = p.teacher
    con.print(f"teacher: {t['params'] / 1e6:.3f} M params, {t['mmacs']:.2f} MMACs, {t['size_mb']:.3f} MB (fp32)")
    c = p.cheapest_cost
    if c:
        lat = f", {c['latency_ms']:.3f} ms (median of a short run)" if c.get("latency_ms") is not None else ""
        con.print(f"cheapest candidate ({p.cheapest.summary()}): {c['params'] / 1e6:.3f} M params, "
                  f"{c['mmacs']:.2f} MMACs, {c['size_mb']:.3f} MB{lat}")
    if p.cheapest_error:
        con.print(f"cheapest candidate failed: {p.cheapest_error}")
    if p.budget.constraints():
        verdict = {True: "meets", False: "MISSES", None: "cannot tell whether it meets"}[p.meets_budget]
        con.print(f"budget {p.budget.describe()}: the cheapest candidate {verdict} it")
    con.print(f"planned in {p.seconds:.1f} s")
    return buf.getvalue()

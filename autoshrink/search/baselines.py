"""Baseline planning: the obvious configurations, tried first so a search never ends worse
than them, and the space's own defaults they are built from."""

from __future__ import annotations

import math

from autoshrink.candidate import Candidate
from autoshrink.space import SearchSpace

__all__ = ["FirstChoice", "as_sampled", "baselines", "space_defaults"]


def baselines(space: SearchSpace, candidate_defaults: Candidate | None = None,
              edge: float | None = None) -> list[Candidate]:
    """The obvious configurations, tried first so a search never ends worse than them:
    all-int8, and int8 with uniform pruning at 25 % and 50 %.

    With ``edge`` (the smallest uniform int8 pruning ratio found to meet the budget, see
    :func:`autoshrink.search.budget_edge`), the ratios below it are known to miss the budget and
    are replaced by the edge itself, which is what an engineer would pick by hand: ``edge`` then
    the fixed ratios above it (at least two baselines: the next step up is a margin for timing
    noise).

    Example:
        >>> [c.default_prune for c in baselines(SearchSpace.default(), edge=0.375)]
        [0.375, 0.5]
    """
    base = candidate_defaults or Candidate()
    ratios = [0.0, 0.25, 0.5]
    if edge is not None:
        ratios = [edge] + [r for r in ratios if r > edge + 1e-9]
        if len(ratios) == 1:
            ratios.append(min(1.0, edge + 0.125))
    return [
        Candidate.uniform(
            bits=8, prune=ratio, temperature=base.kd_temperature, alpha=base.kd_alpha,
            steps=base.finetune_steps, lr=base.lr, batch_size=base.batch_size, round_to=base.round_to,
        )
        for ratio in ratios
    ]


class FirstChoice:
    """A stand-in trial that answers every suggestion with the knob's first choice (a range:
    its middle, geometric for a log range; an integer range: its low end)."""

    def suggest_categorical(self, name, choices):
        return choices[0]

    def suggest_float(self, name, low, high, step=None, log=False):
        return math.sqrt(low * high) if log else (low + high) / 2

    def suggest_int(self, name, low, high, step=1):
        return low


def space_defaults(space: SearchSpace) -> Candidate:
    """The space's own fine-tune settings at their first choice, for the baselines."""
    return space.sample(FirstChoice())


def as_sampled(space: SearchSpace, cand: Candidate) -> Candidate:
    """``cand`` as the search would run it once enqueued: snapped to the space's choices."""
    params = space.candidate_params(cand)
    first = FirstChoice()

    class _Replay:
        def suggest_categorical(self, name, choices):
            return params[name] if name in params else first.suggest_categorical(name, choices)

        def suggest_float(self, name, low, high, step=None, log=False):
            return params[name] if name in params else first.suggest_float(name, low, high, step, log)

        def suggest_int(self, name, low, high, step=1):
            return params[name] if name in params else first.suggest_int(name, low, high, step)

    return space.sample(_Replay())

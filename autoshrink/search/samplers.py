"""The sampler factory: Optuna's samplers by name, seeded."""

from __future__ import annotations

import math

from autoshrink.search.config import SearchError
from autoshrink.space import SearchSpace

__all__ = ["SAMPLERS", "grid_size", "make_sampler"]

SAMPLERS = ("tpe", "nsga2", "random", "grid")


def make_sampler(name: str, seed: int, space: SearchSpace):
    """An Optuna sampler: ``"tpe"`` (reads each trial's constraints), ``"nsga2"``, ``"random"``,
    or ``"grid"`` (every point of :meth:`SearchSpace.grid` once, in a seeded order).

    Raises:
        SearchError: an unknown name.
        SpaceError: ``"grid"`` over a space with a continuous knob.
    """
    import optuna

    name = name.lower()
    if name == "tpe":
        # constraints are read from each trial (Trial.set_constraint), no constraints_func
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=6)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return _grid_sampler(space.grid(), seed)
    raise SearchError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")


def grid_size(sampler) -> int | None:
    """The number of points of a grid sampler from :func:`make_sampler`; None for the others."""
    return getattr(sampler, "size", None)


def _grid_sampler(grid: dict, seed: int):
    """Optuna's GridSampler (every point once, in a seeded random order), minus its habit of
    calling ``study.stop()`` once the grid is covered: that only works inside
    ``study.optimize``, and this driver counts its own trials."""
    import optuna

    class _GridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    sampler = _GridSampler(grid, seed=seed)
    sampler.size = math.prod(len(v) for v in grid.values())
    return sampler

"""Evaluate given configurations: the same trials as a search, without a sampler.

A sweep is stored like a search (Optuna storage in its run folder), so ``load``, ``pareto``,
``show`` and ``export`` work on it too.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from autoshrink.budget import Budget
from autoshrink.candidate import Candidate
from autoshrink.task import Task

__all__ = ["candidate_params", "grid", "sweep"]


def grid(
    bits: Sequence[int] = (8,),
    prune: Sequence[float] = (0.0,),
    temperature: Sequence[float] = (4.0,),
    alpha: Sequence[float] = (0.7,),
    steps: Sequence[int] = (240,),
    lr: Sequence[float] = (0.01,),
    batch_size: int = 32,
    round_to: int | None = 8,
) -> list[Candidate]:
    """Uniform candidates for every combination of the given values.

    Example:
        >>> len(grid(bits=[8, 32], prune=[0, 0.25, 0.5]))
        6
    """
    return [
        Candidate.uniform(bits=b, prune=p, temperature=t, alpha=a, steps=s, lr=r,
                          batch_size=batch_size, round_to=round_to)
        for b, p, t, a, s, r in itertools.product(bits, prune, temperature, alpha, steps, lr)
    ]


def candidate_params(candidate: Candidate) -> dict:
    """A flat record of a candidate, shown as ``param_*`` columns of a sweep."""
    d = {
        "bits": candidate.default_bits,
        "prune": candidate.default_prune,
        "kd_temperature": candidate.kd_temperature,
        "kd_alpha": candidate.kd_alpha,
        "finetune_steps": candidate.finetune_steps,
        "lr": candidate.lr,
    }
    for key, value in candidate.bits.items():
        d[f"bits.{key}"] = value
    for key, value in candidate.prune.items():
        d[f"prune.{key}"] = value
    return d


def sweep(
    task: Task,
    candidates: Iterable[Candidate],
    budget: Budget | None = None,
    *,
    workers: int | None = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    ray_address: str | None = None,
    threads_per_worker: int | None = None,
    latency_runs: int = 60,
    progress: bool = True,
) -> pd.DataFrame:
    """Evaluate each candidate exactly as a search trial would, and return the trials table.

    Args:
        task: teacher, data, metric.
        candidates: configurations to try (e.g. :func:`grid`).
        budget: limits; a candidate that misses them is measured but not fine-tuned.
        workers, seed, ray_address, threads_per_worker, latency_runs, progress: as in
            :func:`autoshrink.search`.
        out: run folder (default ``runs/sweep-<timestamp>``); reopen with ``autoshrink.load``.

    Returns:
        The trials DataFrame (same columns as a search; ``param_*`` describe each candidate).
        ``df.attrs["out"]`` is the run folder.

    Raises:
        TypeError: an item that is not a :class:`Candidate`.

    Example:
        >>> df = sweep(task, grid(bits=[8, 32], prune=[0, 0.25]), Budget(latency_ms=5))  # doctest: +SKIP
    """
    from autoshrink import _env

    _env.configure()
    from autoshrink.result import load
    from autoshrink.search import _Driver, _open_study, _prepare_out, _Settings, default_workers

    cands = list(candidates)
    for i, c in enumerate(cands):
        if not isinstance(c, Candidate):
            raise TypeError(f"candidates[{i}] is a {type(c).__name__}, not an autoshrink.Candidate")
    if not cands:
        raise ValueError("no candidates to evaluate")
    budget = budget or Budget()
    out_dir = _prepare_out(out if out is not None else Path("runs") / time.strftime("sweep-%Y%m%d-%H%M%S"))
    storage = f"sqlite:///{(out_dir / 'study.db').resolve()}"
    import optuna

    study = _open_study(storage, "autoshrink", optuna.samplers.RandomSampler(seed=seed), False,
                        out_dir, None)
    workers = workers or default_workers()
    threads = threads_per_worker or max(1, (os.cpu_count() or 2) // workers)
    settings = _Settings(threads=threads, latency_threads=1, latency_runs=latency_runs,
                         eval_every=0, seed=seed, lock_dir=None)
    driver = _Driver(task, None, budget, study, out_dir, workers, settings, ray_address,
                     False, progress)
    driver.record_meta(kind="sweep", seed=seed, trials=len(cands))
    queue = iter(cands)

    def propose(trial):
        cand = next(queue)
        # not "params": that user attribute is the parameter count (a metric)
        trial.set_user_attr("candidate_params", candidate_params(cand))
        return cand

    try:
        driver.run(len(cands), propose)
    finally:
        driver.close()
    result = load(out_dir)
    result.write()
    df = result.trials
    df.attrs["out"] = str(out_dir)
    return df

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
from autoshrink.record import KIND_SWEEP, StudyAttr, TrialAttr
from autoshrink.task import Task

__all__ = ["candidate_params", "grid", "start_order", "sweep"]


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
    device: str = "cpu",
    gpus_per_trial: float | None = None,
    runtime: str = "inductor",
) -> pd.DataFrame:
    """Evaluate each candidate exactly as a search trial would, and return the trials table.

    Args:
        task: teacher, data, metric.
        candidates: configurations to try (e.g. :func:`grid`).
        budget: limits; a candidate that misses them is measured but not fine-tuned.
        workers, seed, ray_address, threads_per_worker, latency_runs, progress, device,
            gpus_per_trial: as in :func:`autoshrink.search`.
        out: run folder (default ``runs/sweep-<timestamp>``); reopen with ``autoshrink.load``.
        runtime: the deployment runtime each candidate is timed and evaluated in (as in
            :func:`autoshrink.search`).

    Returns:
        The trials DataFrame (same columns as a search; ``param_*`` describe each candidate), one
        row per candidate in the order given, with a last column ``candidate_index``: the
        position in ``candidates`` (``trials.csv`` has it too, in trial order).
        ``df.attrs["out"]`` is the run folder. Trial numbers follow the order the trials started
        in: with several workers the costliest fine-tunes start first (see :func:`start_order`),
        so that no worker idles while a long one runs alone at the end.

    Raises:
        TypeError: an item that is not a :class:`Candidate`.

    Example:
        >>> df = sweep(task, grid(bits=[8, 32], prune=[0, 0.25]), Budget(latency_ms=5))  # doctest: +SKIP
    """
    from autoshrink import _env

    _env.configure()
    from autoshrink.result import load
    from autoshrink.search import (
        DriverConfig,
        TrialSettings,
        default_storage,
        default_threads,
        open_study,
        plan_devices,
        prepare_out,
        run_trials,
    )

    cands = list(candidates)
    for i, c in enumerate(cands):
        if not isinstance(c, Candidate):
            raise TypeError(f"candidates[{i}] is a {type(c).__name__}, not an autoshrink.Candidate")
    if not cands:
        raise ValueError("no candidates to evaluate")
    from autoshrink.runtimes import get as get_runtime

    get_runtime(runtime)  # unknown, or its extra missing: one line, before any work
    budget = budget or Budget()
    devices = plan_devices(device, gpus_per_trial, workers, ray_address)  # before any file or model
    out_dir = prepare_out(out if out is not None else Path("runs") / time.strftime("sweep-%Y%m%d-%H%M%S"))
    import optuna

    study = open_study(default_storage(out_dir), "autoshrink", optuna.samplers.RandomSampler(seed=seed), False,
                       out_dir, None)
    workers = devices.workers
    settings = TrialSettings(threads=threads_per_worker or default_threads(workers), latency_threads=1,
                             latency_runs=latency_runs, seed=seed, device=devices.device,
                             gpus_per_trial=devices.gpus_per_trial, runtime=runtime)
    config = DriverConfig(budget=budget, out=out_dir, workers=workers, settings=settings,
                          ray_address=ray_address, early_stopping=False, progress=progress)
    queue = iter(start_order(task, cands, workers))

    def propose(trial):
        index = next(queue)
        cand = cands[index]
        # not "params": that user attribute is the parameter count (a metric)
        trial.set_user_attr(TrialAttr.CANDIDATE_PARAMS, candidate_params(cand))
        trial.set_user_attr(TrialAttr.CANDIDATE_INDEX, index)
        return cand

    run_trials(task, study, len(cands), config, propose=propose,
               meta={StudyAttr.KIND: KIND_SWEEP, StudyAttr.SEED: seed, StudyAttr.TRIALS: len(cands),
                     StudyAttr.DEVICE: devices.device, StudyAttr.GPUS_PER_TRIAL: devices.gpus_per_trial})
    result = load(out_dir)
    result.write()
    df = result.trials.sort_values(TrialAttr.CANDIDATE_INDEX, kind="stable").reset_index(drop=True)
    df.attrs["out"] = str(out_dir)
    return df


def start_order(task: Task, candidates: Sequence[Candidate], workers: int) -> list[int]:
    """Positions of ``candidates`` in the order to start them: longest fine-tune first.

    With one worker, or no more candidates than workers, the order given. Otherwise the
    longest-processing-time-first rule: the fine-tune's work is estimated as steps × batch size ×
    the teacher's per-layer MACs scaled by ``(1 - prune ratio)²`` (input and output channels both
    shrink), which is enough to rank candidates; ties keep the order given. A teacher whose MACs
    cannot be counted keeps the order given too (its trials will say why).

    Example:
        >>> import torch, torch.nn as nn
        >>> data = torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
        >>> model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(288, 10))
        >>> task = Task(model=model, train_data=data, val_data=data, example_input=torch.zeros(1, 1, 8, 8))
        >>> cands = [Candidate(prune={"0": 0.5}, finetune_steps=100), Candidate(finetune_steps=100),
        ...          Candidate(prune={"0": 0.5}, finetune_steps=300)]
        >>> start_order(task, cands, workers=2)
        [2, 1, 0]
    """
    order = list(range(len(candidates)))
    if workers <= 1 or len(candidates) <= workers:
        return order
    import torch.nn as nn

    from autoshrink.measure.flops import model_cost

    layers = {name: 32 for name, m in task.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    try:
        macs = model_cost(task.model, task.example_input, layers).layer_macs
    except Exception:  # noqa: BLE001 - only an optimisation; each trial counts MACs and records errors
        return order

    def work(c: Candidate) -> float:
        return c.finetune_steps * c.batch_size * sum(m * (1.0 - c.prune_for(n)) ** 2 for n, m in macs.items())

    return sorted(order, key=lambda i: -work(candidates[i]))

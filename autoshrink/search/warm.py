"""Transfer between studies (``search(warm_start=DIR)``, ``autoshrink search --warm-start DIR``).

A new study on the same teacher and space starts from an earlier study's measured trials, so that
a 3 ms search after a 5 ms one does not re-learn where the feasible region is. Unlike ``--resume``
the budget may differ: what the sampler is told about each earlier trial is recomputed against the
new budget from its recorded measurements (``latency_ms``, ``size_mb``, ``mmacs``, ``accuracy``).

What is copied, and how (one FINISHED source trial at a time, see :func:`warm_values`):

- a fine-tuned trial (it has an accuracy) that meets the new budget: its accuracy and its latency
  (raised to a latency budget, as :meth:`autoshrink.search.Driver.tell` does), constraints <= 0;
- any trial that misses the new budget on a recorded measurement (fine-tuned under the old budget
  or rejected by its gate): an infeasible example, accuracy 0 (as a gate rejection is told),
  constraints = the relative excess over each new limit;
- left out: a gate rejection (never fine-tuned, so no accuracy) that meets the new budget. Told as
  feasible it would need an accuracy it never had (0 would teach the sampler that a good region is
  bad); told as infeasible it would be a lie. Likewise a trial with no record of a quantity the
  new budget limits (it cannot be judged), and PRUNED, FAILED and never-run trials.

Copied trials carry ``TrialAttr.WARM_FROM`` (``{"run": source, "trial": number}``, kept from the
origin through chained warm starts). They inform the sampler only: they do not count towards the
new search's ``trials`` (:mod:`autoshrink.search.accounting`), are not early-stopping rivals, and
are not rows of the new run's results (:func:`autoshrink.result.trials_frame` leaves them out, so
they are never ``best``, on the front, re-timed or exported; their models live in the source run).
``StudyAttr.WARM_START`` records what was copied.

Refused, with one line naming the source and the fix (:class:`SearchError`), before any training:
a source with no study or no finished trial, another search space, another deployment runtime or
number of latency threads (its latencies would not transfer), together with ``resume`` (pick one), and, once the task is
built, another teacher (:func:`teacher_fingerprint`). A source study without a teacher fingerprint
(made before warm-start existed) is refused too: only its space could be checked, and a sampler
misled by another teacher's trials fails silently. The machine is not checked: latencies timed on
another machine mislead the sampler (never the results: every new candidate is measured here).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoshrink.budget import Budget
from autoshrink.record import NOT_COUNTED, State, StudyAttr, TrialAttr
from autoshrink.search.config import SearchError
from autoshrink.space import SearchSpace

__all__ = ["WarmSource", "check_warm_start", "copy_trials", "describe", "teacher_fingerprint", "warm_values"]

#: the measurements a budget limits, as recorded on each trial
_LIMITED = (TrialAttr.LATENCY_MS, TrialAttr.SIZE_MB, TrialAttr.MMACS)


@dataclass(frozen=True)
class WarmSource:
    """Where an earlier study lies.

    Args:
        label: the run folder (or storage URL) as given, for messages and ``WARM_FROM``.
        storage: its Optuna storage URL.
        study_name: the study's name in that storage.
    """

    label: str
    storage: str
    study_name: str


def teacher_fingerprint(model) -> str:
    """A short hash (16 hex digits) of a model's ``state_dict``: names, dtypes, shapes and bytes.

    Example:
        >>> import torch
        >>> a = torch.nn.Linear(2, 2)
        >>> teacher_fingerprint(a) == teacher_fingerprint(a), len(teacher_fingerprint(a))
        (True, 16)
    """
    import torch

    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        if not isinstance(value, torch.Tensor):
            h.update(repr(value).encode())
            continue
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _resolve(warm_start: str | os.PathLike, study_name: str) -> tuple[WarmSource, Any]:
    """The source and its loaded study (a run folder's ``study.db``, or a storage URL)."""
    import optuna

    from autoshrink.search.storage import default_storage, open_storage
    from autoshrink.store import StoreError, check_store

    label = str(warm_start)
    url = label if "://" in label else None
    if url is None and not (Path(label) / "study.db").is_file():
        raise SearchError(f"--warm-start: {label!r} holds no search (no study.db); give the run folder of an "
                          "earlier search (its --out)")
    try:
        check_store(label if url is None else None, url)
    except StoreError as exc:
        raise SearchError(f"--warm-start: {exc}") from None
    storage = open_storage(url or default_storage(Path(label)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if study_name not in names and len(names) == 1:
        study_name = names[0]  # a run folder's one study, whatever its name
    if study_name not in names:
        raise SearchError(f"--warm-start: no study {study_name!r} in {label!r} (it holds {names}); "
                          "pass the --study-name of the earlier search")
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler())
    return WarmSource(label=label, storage=url or default_storage(Path(label)), study_name=study_name), study


def check_warm_start(
    warm_start: str | os.PathLike,
    *,
    space: SearchSpace,
    runtime: str = "inductor",
    resume: bool = False,
    study_name: str = "autoshrink",
    teacher: str | None = None,
    latency_threads: int | None = None,
) -> WarmSource:
    """Check that an earlier study can seed a new one; nothing is changed.

    Args:
        warm_start: the earlier run folder (its ``study.db``) or an Optuna storage URL.
        space: the new search's space (its fingerprint must match).
        runtime: the new search's deployment runtime (the source's latencies were timed in one).
        resume: the new search's ``resume`` (refused together with a warm start).
        study_name: the study to read (default: the storage's only study, if it has one).
        teacher: the new teacher's :func:`teacher_fingerprint`; None: not checked yet (the CLI
            checks the rest before a built-in teacher trains).
        latency_threads: the new search's latency threads (None: not checked): the source's
            trials must have been timed with as many.

    Returns:
        The source.

    Raises:
        SearchError: one line naming the source, what differs and the fix.
    """
    if resume:
        raise SearchError("--warm-start and --resume: pick one (--resume continues the study in --out with "
                          "its own trials and budget; --warm-start starts a new study from another run's)")
    source, study = _resolve(warm_start, study_name)
    attrs = study.user_attrs
    where = f"--warm-start: the study in {source.label!r}"
    fp = attrs.get(StudyAttr.SPACE_FINGERPRINT)
    if fp is None:
        raise SearchError(f"{where} records no search space (a sweep?); warm-start from an earlier "
                          "`autoshrink search`")
    if fp != space.fingerprint():
        raise SearchError(f"{where} was made with a different search space "
                          f"({attrs.get(StudyAttr.SPACE_SOURCE)}, now {space.source}); use the same space, "
                          "or start without --warm-start")
    before = attrs.get(StudyAttr.RUNTIME, "inductor")
    if before != runtime:
        raise SearchError(f"{where} was timed in {before}, not {runtime}: its latencies do not transfer; "
                          f"use --runtime {before}, or start without --warm-start")
    done = study.get_trials(deepcopy=False, states=(State.COMPLETE.optuna,))
    if not done:
        raise SearchError(f"{where} has no finished trial to start from; start without --warm-start")
    timed = sorted({t.user_attrs[TrialAttr.LATENCY_THREADS] for t in done
                    if t.user_attrs.get(TrialAttr.LATENCY_THREADS)})
    if latency_threads is not None and timed and timed != [latency_threads]:
        raise SearchError(f"{where} timed latency with {', '.join(map(str, timed))} thread(s), now {latency_threads}: "
                          f"its latencies do not transfer; use --latency-threads {timed[0]}, or start without "
                          "--warm-start")
    if teacher is not None:
        had = attrs.get(StudyAttr.TEACHER_FINGERPRINT)
        if had is None:
            raise SearchError(f"{where} predates warm-start (it records no teacher fingerprint), so its "
                              "teacher cannot be checked; start without --warm-start")
        if had != teacher:
            raise SearchError(f"{where} was made with another teacher (weights {had}, now {teacher}); "
                              "warm-start from a run of the same model and weights, or start without "
                              "--warm-start")
    return source


def warm_values(trial, budget: Budget) -> tuple[list[float], dict[str, float], bool] | None:
    """What the sampler of a new study under ``budget`` is told about an earlier ``trial``.

    Returns:
        ``(values, constraints, feasible)`` (values: accuracy, latency, as the driver tells
        them; constraints: the relative excess over each limit, <= 0 feasible), or None for a
        trial left out (see the module's docstring).

    Example:
        >>> from types import SimpleNamespace
        >>> from autoshrink.budget import Budget
        >>> from autoshrink.record import TrialAttr
        >>> rejected_at_5ms = SimpleNamespace(state=SimpleNamespace(name="COMPLETE"), user_attrs={
        ...     TrialAttr.LATENCY_MS: 6.0, TrialAttr.MEETS_BUDGET: False})
        >>> warm_values(rejected_at_5ms, Budget(latency_ms=3.0))
        ([0.0, 6.0], {'latency_ms': 1.0}, False)
        >>> warm_values(rejected_at_5ms, Budget(latency_ms=8.0)) is None  # meets 8 ms, never fine-tuned
        True
    """
    a = trial.user_attrs
    if State.of(trial) is not State.COMPLETE or a.get(TrialAttr.ERROR) in NOT_COUNTED:
        return None
    measured = {k: float(a[k]) for k in _LIMITED if a.get(k) is not None}
    limits = budget.constraints()
    constraints = {k: (measured[k] - limit) / limit if k in measured else 0.0 for k, limit in limits.items()}
    latency = measured.get(TrialAttr.LATENCY_MS)
    if budget.violations(measured):
        return [0.0, latency if latency is not None else 1e9], constraints, False
    acc = a.get(TrialAttr.ACCURACY)
    if acc is None or acc != acc or any(k not in measured for k in limits):
        return None  # meets the new budget but was never fine-tuned, or cannot be judged
    if latency is not None and budget.latency_ms is not None:
        latency = max(latency, budget.latency_ms)  # within the budget, faster is worth nothing
    return [float(acc), latency if latency is not None else 1e9], constraints, True


def copy_trials(source: WarmSource, study, budget: Budget) -> dict:
    """Add the earlier study's trials to ``study`` as :func:`warm_values` tells them (once: a
    study that already holds warm trials, another driver sharing it copied them, is left alone).

    Returns:
        The summary, also stored as ``StudyAttr.WARM_START``: ``from``, ``copied``,
        ``infeasible`` (of those copied, over the new budget) and ``left_out``.
    """
    import optuna

    if any(TrialAttr.WARM_FROM in t.user_attrs for t in study.get_trials(deepcopy=False)):
        return dict(study.user_attrs.get(StudyAttr.WARM_START) or {})
    _, src = _resolve(source.label, source.study_name)
    made, infeasible, left_out = [], 0, 0
    for t in src.get_trials(deepcopy=False, states=(State.COMPLETE.optuna,)):
        told = warm_values(t, budget)
        if told is None:
            left_out += 1
            continue
        values, constraints, feasible = told
        infeasible += not feasible
        attrs = dict(t.user_attrs)
        attrs[TrialAttr.WARM_FROM] = attrs.get(TrialAttr.WARM_FROM) or {"run": source.label, "trial": t.number}
        made.append(optuna.trial.create_trial(
            state=State.COMPLETE.optuna, values=values, params=t.params, distributions=t.distributions,
            user_attrs=attrs, constraints=constraints,
        ))
    study.add_trials(made)
    summary = {"from": source.label, "copied": len(made), "infeasible": infeasible, "left_out": left_out}
    study.set_user_attr(StudyAttr.WARM_START, summary)
    return summary


def describe(summary: dict, budget: Budget) -> str:
    """One line for the progress output: what a warm start copied."""
    return (f"warm start: {summary.get('copied', 0)} trial(s) of {summary.get('from')} told to the sampler "
            f"({summary.get('infeasible', 0)} over {budget.describe()}; {summary.get('left_out', 0)} left out: "
            "never fine-tuned or not measured for it); they inform the sampler only, not this run's results")

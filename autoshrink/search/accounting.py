"""Trial accounting: which trials of a study count towards a search's total, as pure functions
over lists of Optuna ``FrozenTrial`` (``study.get_trials(deepcopy=False)``), in storage order.

A trial counts when it is finished or running anywhere (several drivers may share a study),
except those the driver itself marked as not counting (interrupted: re-run on resume; surplus:
never run), those copied from an earlier study (``TrialAttr.WARM_FROM``: a warm start's, for the
sampler only, see :mod:`autoshrink.search.warm`) and the first ``screen_limit`` candidates the
budget gate rejected (measured in seconds, never fine-tuned).

Example:
    >>> import optuna
    >>> from autoshrink.record import STUDY_DIRECTIONS
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> study = optuna.create_study(directions=STUDY_DIRECTIONS)
    >>> _ = study.tell(study.ask(), [90.0, 1.0])
    >>> running = study.ask()
    >>> committed(study.get_trials()), finished(study.get_trials())
    (2, 1)
    >>> is_surplus(study.get_trials(), running.number, total=1)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autoshrink.record import COUNTED_STATES, FIXED_PARAMS, NOT_COUNTED, Reason, State, TrialAttr

__all__ = ["committed", "count", "finished", "is_surplus", "is_warm", "reruns", "screened"]


def is_warm(trial: Any) -> bool:
    """A trial copied from an earlier study by a warm start: it informs the sampler only."""
    return TrialAttr.WARM_FROM in trial.user_attrs


def screened(trial: Any) -> bool:
    """A trial the budget gate rejected: measured, over budget, never fine-tuned."""
    a = trial.user_attrs
    return (State.of(trial) is State.COMPLETE and a.get(TrialAttr.MEETS_BUDGET) is False
            and not a.get(TrialAttr.FINETUNE_S) and a.get(TrialAttr.ERROR) not in NOT_COUNTED)


def count(trials: Sequence[Any], *, screen_limit: int = 0, running: bool = True,
          before: int | None = None) -> int:
    """Trials that count towards the total (below trial number ``before`` if given): finished
    ones and, with ``running``, running ones; not the interrupted, surplus or warm ones, nor the first
    ``screen_limit`` candidates the budget gate rejected."""
    states = COUNTED_STATES if running else tuple(s for s in COUNTED_STATES if s is not State.RUNNING)
    counted = [
        t for t in trials
        if State.of(t) in states and t.user_attrs.get(TrialAttr.ERROR) not in NOT_COUNTED and not is_warm(t)
        and (before is None or t.number < before)
    ]
    return len(counted) - min(sum(1 for t in counted if screened(t)), screen_limit)


def committed(trials: Sequence[Any], screen_limit: int = 0) -> int:
    """Trials that count, running ones included: a new trial starts while this is below the total."""
    return count(trials, screen_limit=screen_limit)


def finished(trials: Sequence[Any], screen_limit: int = 0) -> int:
    """Finished trials that count (the progress bar's figure)."""
    return count(trials, screen_limit=screen_limit, running=False)


def is_surplus(trials: Sequence[Any], number: int, total: int, screen_limit: int = 0) -> bool:
    """True if trial ``number`` is beyond the total: drivers sharing a study may both see room
    for one more trial and both ask; the lower trial numbers (storage order) win."""
    return count(trials, screen_limit=screen_limit, before=number) >= total


def reruns(trials: Sequence[Any]) -> list[tuple[int, dict]]:
    """``(number, params)`` of each interrupted trial that no later trial re-runs yet.

    A driver killed between ask and sampling left no params: an enqueued trial (a baseline, a
    re-run) still has the ones it was given; a sampled one is just dropped.
    """
    rerun = {t.user_attrs.get(TrialAttr.RERUN_OF) for t in trials}
    out = []
    for t in trials:
        if (State.of(t) is not State.FAIL or t.user_attrs.get(TrialAttr.ERROR) != Reason.INTERRUPTED
                or t.number in rerun):
            continue
        params = {**t.system_attrs.get(FIXED_PARAMS, {}), **t.params}
        if params:
            out.append((t.number, params))
    return out

"""A second record of the study, one small file per trial, and rebuilding ``study.db`` from it.

``study.db`` is one file: a full disk or a crash mid-write can leave it unreadable, and with it
every trial of the run. So each finished trial also writes ``trials/NNNN/metrics.json`` (next to
its ``candidate.json``, atomically) with everything Optuna needs to re-create it: number,
state, objective values, parameters with their distributions, user and system attributes
(the budget constraints live there), intermediate values and times. The study's own attributes
and directions go to ``study.json``. :func:`recover` turns those files back into a
``study.db`` with the same trial numbers, after moving the damaged one aside (never deleting it).

Example:
    >>> import tempfile, optuna
    >>> out = tempfile.mkdtemp()
    >>> study = optuna.create_study(directions=["maximize", "minimize"])
    >>> trial = study.ask({"prune": optuna.distributions.FloatDistribution(0.0, 0.5)})
    >>> _ = write_trial_record(out, study.tell(trial, [91.5, 2.0]))
    >>> _ = write_study_record(out, study_name="autoshrink", directions=["maximize", "minimize"],
    ...                        user_attrs={"task": "digits"})
    >>> recover(out).trials
    1
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoshrink._files import write_text_atomic
from autoshrink.record import STUDY_DIRECTIONS, Reason, State, TrialAttr
from autoshrink.store import STUDY_DB, StoreError, check_study_db, trial_records

__all__ = [
    "NOT_RECOVERED", "Recovery", "read_trial_record", "recover", "write_study_record", "write_trial_record",
]

RECORD_FORMAT = 1
TRIAL_RECORD = "metrics.json"
STUDY_RECORD = "study.json"
DEFAULT_STUDY_NAME = "autoshrink"
DEFAULT_DIRECTIONS = tuple(STUDY_DIRECTIONS)
# the error of a trial number that has no record: it had not finished when the store broke, or
# its record was lost; recovered as FAIL so that later trials keep their numbers
NOT_RECOVERED = Reason.NOT_RECOVERED
# states a record is written for (a waiting or running trial has nothing to keep yet)
_FINISHED = tuple(s.value for s in State if s.finished)


def _trial_dir(out: str | os.PathLike, number: int) -> Path:
    return Path(out) / "trials" / f"{number:04d}"


def _json_safe(value: Any) -> Any:
    """``value`` with what JSON cannot hold made so: NaN/inf floats as None, tuples as lists,
    other objects as their ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


def _time(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def write_trial_record(out: str | os.PathLike, trial, metrics: Mapping[str, Any] | None = None) -> Path:
    """Write ``trials/NNNN/metrics.json`` for a finished trial, atomically.

    Args:
        out: the run folder.
        trial: the ``optuna.trial.FrozenTrial`` as stored (``Study.tell`` returns it).
        metrics: what the trial measured (the worker's result), kept for people and tools
            reading the folder; the study is rebuilt from the trial's own fields.

    Returns:
        The record's path.

    Raises:
        ValueError: a trial that has not finished (nothing to record yet).
    """
    import optuna

    if trial.state.name not in _FINISHED:
        raise ValueError(f"trial {trial.number} is {trial.state.name}: only a finished trial has a record")
    record = {
        "format": RECORD_FORMAT,
        "number": trial.number,
        "state": trial.state.name,
        "values": list(trial.values) if trial.values is not None else None,
        "params": _json_safe(trial.params),
        "distributions": {name: optuna.distributions.distribution_to_json(d)
                          for name, d in trial.distributions.items()},
        "user_attrs": _json_safe(trial.user_attrs),
        "system_attrs": _json_safe(trial.system_attrs),
        "intermediate_values": {str(step): v for step, v in trial.intermediate_values.items()},
        "datetime_start": _time(trial.datetime_start),
        "datetime_complete": _time(trial.datetime_complete),
        "metrics": _json_safe(dict(metrics or {})),
    }
    # json.dumps would write NaN/Infinity (not JSON); an objective value may be one
    record["values"] = [v if math.isfinite(v) else str(v) for v in record["values"]] if record["values"] else None
    record["intermediate_values"] = {k: v if math.isfinite(v) else str(v)
                                     for k, v in record["intermediate_values"].items()}
    return write_text_atomic(_trial_dir(out, trial.number) / TRIAL_RECORD,
                             json.dumps(record, indent=1, allow_nan=False) + "\n")


def write_study_record(out: str | os.PathLike, *, study_name: str, directions: Sequence[Any],
                       user_attrs: Mapping[str, Any]) -> Path:
    """Write the study's name, directions and user attributes to ``study.json``, atomically.

    ``directions`` may be Optuna ``StudyDirection`` values or their names ("maximize").
    """
    names = [d.name.lower() if hasattr(d, "name") else str(d).lower() for d in directions]
    record = {"format": RECORD_FORMAT, "study_name": study_name, "directions": names,
              "user_attrs": _json_safe(dict(user_attrs))}
    return write_text_atomic(Path(out) / STUDY_RECORD, json.dumps(record, indent=1, allow_nan=False) + "\n")


def _number(value: Any) -> float:
    return float(value)  # "nan", "inf" (written as text) and numbers alike


def read_trial_record(path: str | os.PathLike):
    """The ``optuna.trial.FrozenTrial`` a ``metrics.json`` describes (its ``trial_id`` is 0:
    a storage gives it its own).

    Raises:
        ValueError: a record that is not JSON or lacks a field, naming the file.
    """
    import optuna
    from optuna.trial import FrozenTrial, TrialState

    path = Path(path)
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
        state = TrialState[r["state"]]
        start, complete = r.get("datetime_start"), r.get("datetime_complete")
        return FrozenTrial(
            number=int(r["number"]), state=state, value=None,
            values=[_number(v) for v in r["values"]] if r.get("values") is not None else None,
            datetime_start=dt.datetime.fromisoformat(start) if start else None,
            datetime_complete=dt.datetime.fromisoformat(complete) if complete else None,
            params=r["params"],
            distributions={name: optuna.distributions.json_to_distribution(d)
                           for name, d in r["distributions"].items()},
            user_attrs=r.get("user_attrs") or {}, system_attrs=r.get("system_attrs") or {},
            intermediate_values={int(k): _number(v) for k, v in (r.get("intermediate_values") or {}).items()},
            trial_id=0,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a trial record ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover` did.

    Attributes:
        path: the rebuilt ``study.db``.
        trials: trials rebuilt from their records.
        missing: trial numbers without a record, added as FAIL (:data:`NOT_RECOVERED`).
        unreadable: records that could not be read (their trials count as missing).
        moved_to: where the damaged ``study.db`` went (None if there was none).
    """

    path: Path
    trials: int
    missing: tuple[int, ...] = ()
    unreadable: tuple[Path, ...] = ()
    moved_to: Path | None = None

    def summary(self) -> str:
        """One line for the command to print."""
        text = f"recovered {self.trials} trial{'' if self.trials == 1 else 's'} into {self.path}"
        if self.missing:
            shown = ", ".join(map(str, self.missing[:10])) + (", ..." if len(self.missing) > 10 else "")
            text += f"; {len(self.missing)} without a record added as failed ({shown})"
        if self.unreadable:
            text += f"; {len(self.unreadable)} unreadable record(s): {', '.join(map(str, self.unreadable[:3]))}"
        if self.moved_to is not None:
            text += f"; the damaged store is kept as {self.moved_to}"
        return text


def recover(run_dir: str | os.PathLike, *, force: bool = False) -> Recovery:
    """Rebuild ``run_dir/study.db`` from the run folder's records (``trials/NNNN/metrics.json``
    and ``study.json``), with the same study name, directions, study attributes and trial numbers.

    A damaged ``study.db`` is moved aside to ``study.db.damaged-<UTC time>`` (with its journal,
    if any), never deleted. Trial numbers without a record (a trial that had not finished) are
    added as FAIL trials with the error :data:`NOT_RECOVERED`, so that every recovered trial
    keeps its number (``trials/NNNN`` and ``--trial N`` still name it). The new store is built
    under a temporary name and moved into place last: a crash midway leaves the folder as it was.

    Args:
        run_dir: the run folder.
        force: rebuild even if ``study.db`` is intact (it is moved aside all the same).

    Returns:
        A :class:`Recovery` (``.summary()`` is one line to print).

    Raises:
        StoreError: not a folder, no trial records, or an intact ``study.db`` without ``force``.
    """
    import optuna

    run = Path(run_dir)
    if not run.is_dir():
        raise StoreError(f"{run}: no such run folder")
    db = run / STUDY_DB
    records = trial_records(run)
    if not records:
        raise StoreError(f"{run}: no trial records (trials/NNNN/{TRIAL_RECORD}) to rebuild {STUDY_DB} from")
    if os.path.lexists(db) and not force:
        try:
            check_study_db(db)
        except StoreError:
            pass  # damaged: what recover is for
        else:
            raise StoreError(f"{db} is intact: nothing to recover (pass --force to rebuild it from trials/ anyway)")

    trials, unreadable = {}, []
    for path in records:
        try:
            t = read_trial_record(path)
        except ValueError:
            unreadable.append(path)
            continue
        trials[t.number] = t
    if not trials:
        raise StoreError(f"{run}: none of the {len(records)} trial records could be read "
                         f"(first: {unreadable[0]})")
    name, directions, attrs = DEFAULT_STUDY_NAME, list(DEFAULT_DIRECTIONS), {}
    study_record = run / STUDY_RECORD
    if study_record.is_file():
        try:
            r = json.loads(study_record.read_text(encoding="utf-8"))
            name, directions, attrs = r["study_name"], r["directions"], r.get("user_attrs") or {}
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"{study_record}: unreadable ({exc}): move it away to recover with the "
                             "default study name and directions") from None

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    tmp = run / f".{STUDY_DB}.recovering-{stamp}"
    missing = []
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp.resolve()}")
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(storage=storage, study_name=name, directions=directions)
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        for number in range(max(trials) + 1):
            # a storage numbers trials in the order they are added: fill the gaps to keep them
            trial = trials.get(number)
            if trial is None:
                missing.append(number)
                trial = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                                  user_attrs={TrialAttr.ERROR: NOT_RECOVERED})
            study.add_trial(trial)
        numbers = [t.number for t in study.get_trials(deepcopy=False)]
        if numbers != list(range(max(trials) + 1)):  # a storage that numbers otherwise
            raise StoreError(f"{run}: the rebuilt study numbered its trials {numbers[:5]}...; nothing was changed")
    except BaseException:
        storage.engine.dispose()
        tmp.unlink(missing_ok=True)
        raise
    storage.engine.dispose()
    moved_to = None
    if os.path.lexists(db):
        moved_to = run / f"{STUDY_DB}.damaged-{stamp}"
        os.replace(db, moved_to)
        for suffix in ("-journal", "-wal", "-shm"):  # SQLite's side files belong to the old store
            side = run / f"{STUDY_DB}{suffix}"
            if side.exists():
                os.replace(side, run / f"{moved_to.name}{suffix}")
    os.replace(tmp, db)
    return Recovery(path=db, trials=len(trials), missing=tuple(missing), unreadable=tuple(unreadable),
                    moved_to=moved_to)

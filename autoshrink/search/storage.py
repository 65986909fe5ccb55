"""Storage and run folders: the Optuna storage of a run, opening its study, and the checks made
on a run folder before anything is built (writable, resumable, same space and budget)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from autoshrink.budget import Budget
from autoshrink.record import STUDY_DIRECTIONS, StudyAttr
from autoshrink.search.config import SearchError
from autoshrink.space import SearchSpace
from autoshrink.store import StoreError, check_store

__all__ = ["check_run_folder", "check_study", "default_storage", "open_storage", "open_study", "prepare_out"]


def prepare_out(out: str | os.PathLike | None) -> Path:
    """The run folder (default ``runs/<timestamp>``), created, and checked to be writable.

    Raises:
        SearchError: the folder cannot be created or written to.
    """
    path = Path(out) if out is not None else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise SearchError(f"out folder {str(path)!r} is not writable: {exc.strerror or exc}") from None
    return path


def default_storage(out: Path) -> str:
    """The storage URL of a run folder's own study: ``sqlite:///<out>/study.db``."""
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def open_storage(url: str):
    """An Optuna storage for ``url``. SQLite waits up to a minute for a lock held by another
    driver sharing the file (its default, 5 s, is too short on a loaded machine), and each of its
    transactions takes the write lock when it begins (see :func:`_serialise_sqlite`)."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    sqlite = url.startswith("sqlite:")
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if sqlite else {}
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(url, **kwargs)
            if sqlite:
                _serialise_sqlite(storage.engine)
            return storage
        except (IntegrityError, OperationalError, ProgrammingError):
            # two drivers creating one new store race to create its schema (PostgreSQL: its enum
            # types, then "relation already exists") and stamp its version; the loser finds the
            # schema there on a second look
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _serialise_sqlite(engine) -> None:
    """Make each SQLite transaction ``BEGIN IMMEDIATE`` (SQLAlchemy's recipe for pysqlite).

    Python's sqlite3 begins a transaction only at its first write, so Optuna's read-then-write
    steps are not atomic across processes: two drivers asking at once both read the same
    enqueued (WAITING) trial and both set it RUNNING, then run it twice, and the second to finish
    fails on a finished trial. Taking the lock at ``BEGIN`` makes the read and the write one
    step; the other driver waits (up to the minute's timeout) instead.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made while Optuna set up the schema predate the hooks


def check_study(storage, study_name: str, resume: bool, out: Path, space: SearchSpace | None,
                join: bool, budget: Budget | None = None) -> None:
    """The checks :func:`autoshrink.search` makes on an existing storage, without changing it.

    Raises:
        SearchError: naming the run folder and what to do instead.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summaries = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if resume and study_name not in summaries:
        raise SearchError(
            f"--resume: no study {study_name!r} in the run folder {str(out)!r}; "
            "start a new search without --resume"
        )
    if study_name not in summaries:
        return
    study = optuna.load_study(study_name=study_name, storage=storage,
                              sampler=optuna.samplers.RandomSampler())
    if not resume and not join and any(t.state.is_finished() for t in study.trials):
        raise SearchError(
            f"{str(out)!r} already holds a search ({len(study.trials)} "
            f"trial{'' if len(study.trials) == 1 else 's'}); "
            "pass --resume to continue it or choose another --out"
        )
    made_with = f"{'--resume: ' if resume else ''}the study in {str(out)!r} was made with"
    fp = study.user_attrs.get(StudyAttr.SPACE_FINGERPRINT)
    if space is not None and fp is not None and fp != space.fingerprint():
        raise SearchError(f"{made_with} a different search space "
                          f"({study.user_attrs.get(StudyAttr.SPACE_SOURCE)}, "
                          f"now {space.source}); use the same space or a new --out")
    before = study.user_attrs.get(StudyAttr.BUDGET)
    if budget is not None and before is not None and before != budget.constraints():
        # trials told to the sampler as (in)feasible under one budget would mislead it under another
        raise SearchError(f"{made_with} the budget {Budget(**before).describe()}, now {budget.describe()}; "
                          "use the same budget or a new --out (its trials stay: `autoshrink show` lists "
                          "them with their measured costs)")


def check_run_folder(
    out: str | os.PathLike | None,
    *,
    resume: bool = False,
    storage: str | None = None,
    study_name: str = "autoshrink",
    space: SearchSpace | None = None,
    budget: Budget | None = None,
) -> Path:
    """Check a run folder as :func:`autoshrink.search` will, before any model is built (a
    built-in task may train its teacher for minutes first): the folder is writable, ``resume``
    finds its study, made with the same ``space`` and ``budget``, and a new search does not
    overwrite an old one.

    Returns:
        The run folder (created if it did not exist).

    Raises:
        SearchError: naming the folder and what to do instead.
        StoreError: the folder's ``study.db`` or the ``storage`` URL cannot be used (damaged, not a
            database, no driver, no server); nothing in the folder is changed.

    Example:
        >>> import tempfile
        >>> check_run_folder(tempfile.mkdtemp()).is_dir()
        True
    """
    try:  # first: a damaged store is one line, before anything is created or trained
        check_store(out, storage)
    except StoreError as exc:
        if resume and out is not None and "autoshrink recover" not in str(exc) and storage is None:
            raise StoreError(f"--resume: {exc}; if trials/ holds records, `autoshrink recover {out}` "
                             "rebuilds it") from None
        raise StoreError(f"--resume: {exc}" if resume else str(exc)) from None
    if resume:
        if out is None:
            raise SearchError("--resume needs the run folder to continue (--out DIR)")
        if storage is None and not (Path(out) / "study.db").is_file():
            raise SearchError(
                f"--resume: {str(out)!r} holds no search (no study.db); "
                "start a new search without --resume"
            )
    path = prepare_out(out)
    if storage is None and not (path / "study.db").is_file():
        return path  # a new run folder: nothing more to check
    url = storage or default_storage(path)
    check_study(open_storage(url), study_name, resume, path, space, join=storage is not None, budget=budget)
    return path


def open_study(storage: str, study_name: str, sampler, resume: bool, out: Path,
               space: SearchSpace | None, join: bool = False, budget: Budget | None = None):
    """The run's study (created if new), after :func:`check_study`; its directions are
    :data:`autoshrink.record.OBJECTIVES`'."""
    import optuna

    store = open_storage(storage)
    check_study(store, study_name, resume, out, space, join, budget)
    return optuna.create_study(
        storage=store, study_name=study_name, sampler=sampler,
        directions=STUDY_DIRECTIONS, load_if_exists=True,
    )

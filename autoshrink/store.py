"""Pre-flight checks of a run folder's ``study.db`` and of a ``--storage`` URL.

Every command that opens a store calls these first, so that a damaged file, a mistyped URL, a
missing database driver or an unreachable server is one line naming the problem and the fix,
not an 80-line SQLAlchemy traceback minutes into a search. The checks only read: they never
create, change, move or delete anything (a SQLite file is opened read-only, a server is only
connected to).

Example:
    >>> import tempfile
    >>> check_store(tempfile.mkdtemp())   # a new run folder: nothing to check
    >>> check_storage_url("notaurl")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    autoshrink.store.StoreError: --storage 'notaurl' is not a database URL: write it as sqlite:///PATH/study.db or ...
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from pathlib import Path

from autoshrink.errors import AutoshrinkError

__all__ = ["StoreError", "check_storage_url", "check_store", "check_study_db", "trial_records"]

STUDY_DB = "study.db"
# the tables every Optuna RDB storage has, whatever its schema version
OPTUNA_TABLES = frozenset({"studies", "trials", "version_info"})
CONNECT_TIMEOUT_S = 5
# how each database driver takes a connect timeout (seconds)
_TIMEOUT_ARG = {
    "psycopg": "connect_timeout", "psycopg2": "connect_timeout", "pg8000": "timeout",
    "pymysql": "connect_timeout", "mysqldb": "connect_timeout", "mysqlconnector": "connection_timeout",
}
# what to install for a driver that is missing, by SQLAlchemy backend
_DRIVER_HINT = {
    "postgresql": 'no PostgreSQL driver: pip install "autoshrink[postgres]"',
    "mysql": "no MySQL driver: pip install pymysql, and write the URL as mysql+pymysql://...",
}
_SQLITE_BUSY_TIMEOUT_S = 10


class StoreError(AutoshrinkError, ValueError):
    """A run folder's store or a storage URL that cannot be used; the message says what to do."""


def trial_records(run_dir: str | os.PathLike) -> list[Path]:
    """The per-trial records (``trials/NNNN/metrics.json``) in a run folder, by trial number."""
    return sorted(Path(run_dir).glob("trials/[0-9]*/metrics.json"))


def _damaged(db: Path, what: str) -> StoreError:
    run = db.parent
    records = trial_records(run)
    fix = "move it away or start with a new --out"
    if records:
        fix += (f"; `autoshrink recover {run}` rebuilds it from trials/ ({len(records)} trial "
                f"record{'' if len(records) == 1 else 's'})")
    else:
        fix += " (trials/ holds no records to rebuild it from)"
    return StoreError(f"{db} {what}: {fix}")


def check_study_db(db: str | os.PathLike) -> None:
    """Check that ``db`` (a run folder's ``study.db``) is a readable, intact Optuna SQLite
    store, reading it only (``mode=ro``; SQLite's own ``PRAGMA quick_check``).

    A missing file passes (a new run folder). An empty file passes too unless the folder
    holds trial records: then it is what a crash or a full disk left behind.

    Raises:
        StoreError: a directory, an unreadable file, not a database (garbage, truncated,
            damaged pages), or a database that is not an Optuna study; the message says to
            run ``autoshrink recover`` when there are trial records to rebuild it from.

    Example:
        >>> import pathlib, tempfile
        >>> db = pathlib.Path(tempfile.mkdtemp()) / "study.db"
        >>> _ = db.write_bytes(b"not a database, just bytes" * 100)
        >>> check_study_db(db)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        autoshrink.store.StoreError: .../study.db is not a database (damaged?): move it away ...
    """
    path = Path(db)
    if not os.path.lexists(path):
        return
    if path.is_dir():
        raise StoreError(f"{path} is a folder, not a database file: move it away or start with a new --out")
    if not path.is_file():
        raise StoreError(f"{path} is not a regular file (a broken link or a device?): "
                         "move it away or start with a new --out")
    if not os.access(path, os.R_OK):
        raise StoreError(f"{path} is not readable (permission denied): fix its permissions "
                         f"(chmod u+r {path}) or run as its owner")
    size = path.stat().st_size
    if size == 0:
        if trial_records(path.parent):
            raise _damaged(path, "is empty (damaged?)")
        return  # a store that was being created: SQLite and Optuna take an empty file as new
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True, timeout=_SQLITE_BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open it ({exc}): check the file and its folder") from None
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        problems = [row[0] for row in con.execute("PRAGMA quick_check")]
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise StoreError(f"{path} stayed locked by another process for {_SQLITE_BUSY_TIMEOUT_S} s: "
                             "wait for the other search to finish, or use another --out") from None
        raise _damaged(path, "is not a database (damaged?)") from None
    except sqlite3.DatabaseError:  # "file is not a database", "database disk image is malformed"
        raise _damaged(path, "is not a database (damaged?)") from None
    finally:
        con.close()
    if problems != ["ok"]:
        detail = " ".join(" ".join(map(str, problems)).replace("*** in database main ***", "").split())
        raise _damaged(path, f"is damaged (SQLite's check: {detail[:100]})")
    if not OPTUNA_TABLES <= tables:
        raise _damaged(path, f"is an SQLite database but not an Optuna study (no "
                             f"{', '.join(sorted(OPTUNA_TABLES - tables))} table)")


def check_storage_url(url: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Check a ``--storage`` URL before anything is built on it: it parses, its database driver
    is installed, a SQLite file's folder exists (and the file, if there, is intact: see
    :func:`check_study_db`), and a database server answers within ``timeout_s`` seconds.

    Raises:
        StoreError: naming the URL (without its password) and the fix.

    Example:
        >>> check_storage_url("sqlite:////nonexistent/dir/x.db")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        autoshrink.store.StoreError: --storage sqlite:////nonexistent/dir/x.db: the folder /nonexistent/dir ...
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise StoreError(f"--storage {url!r} is not a database URL: write it as sqlite:///PATH/study.db "
                         "or postgresql://USER@HOST/DB") from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise StoreError(f"--storage {shown}: unknown database kind {parsed.drivername!r}: use sqlite:///PATH, "
                         "postgresql://... or mysql+pymysql://...") from None
    backend = parsed.get_backend_name()
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        hint = _DRIVER_HINT.get(backend, f"no driver for {parsed.drivername} ({exc}): install it")
        raise StoreError(f"--storage {shown}: {hint}") from None
    if backend == "sqlite":
        _check_sqlite_url(parsed, shown)
        return
    _check_server(parsed, shown, dialect.driver, timeout_s)


def _check_sqlite_url(parsed, shown: str) -> None:
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return  # in memory, or a URI filename SQLite resolves itself
    db = Path(database).expanduser()
    folder = db.parent if str(db.parent) else Path(".")
    if not folder.is_dir():
        raise StoreError(f"--storage {shown}: the folder {folder} does not exist: create it first or fix the path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StoreError(f"--storage {shown}: the folder {folder} is not writable: fix its permissions or "
                         "choose another path")
    check_study_db(db)


def _check_server(parsed, shown: str, driver: str, timeout_s: float) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    arg = _TIMEOUT_ARG.get(driver)
    connect_args = {arg: max(1, round(timeout_s))} if arg else {}
    engine = create_engine(parsed, connect_args=connect_args, poolclass=_null_pool())
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        reason = _reason(getattr(exc, "orig", None) or exc)
        host = parsed.host or parsed.query.get("host") or "localhost"  # ?host=/dir: a Unix socket
        where = f"{host}" + (f":{parsed.port}" if parsed.port else "")
        raise StoreError(f"--storage {shown}: cannot connect to the database server at {where} within "
                         f"{timeout_s:g} s ({reason}): is it running, and are the host, port, user and "
                         "database right?") from None
    finally:
        engine.dispose()


def _null_pool():
    from sqlalchemy.pool import NullPool

    return NullPool


def _reason(exc: BaseException) -> str:
    """The part of a driver's connect error that says why: libpq's reads "connection failed:
    connection to server at "h", port 1 failed: FATAL:  database "x" does not exist"."""
    raw = str(exc)
    for marker in ("FATAL:", "failed:"):
        if marker in raw:
            raw = raw.rsplit(marker, 1)[1]
            break
    # the first line: libpq's second one is its own "is the server running" hint
    lines = [" ".join(line.split()) for line in raw.splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def check_store(out: str | os.PathLike | None = None, storage: str | None = None) -> None:
    """The one pre-flight check of where a command will read or write its study: ``storage``
    (a URL, see :func:`check_storage_url`) if given, else ``out``'s ``study.db``
    (:func:`check_study_db`). Only reads; a run folder that does not exist yet passes.

    Raises:
        StoreError: naming the file or URL, the problem and the fix.
    """
    if storage is not None:
        check_storage_url(storage)
    elif out is not None:
        check_study_db(Path(out) / STUDY_DB)

"""Pre-flight checks of a run folder's study.db and of --storage URLs: each bad store is one line
naming the problem and the fix, and checking it changes nothing in the folder."""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import sys
from pathlib import Path

import optuna
import pytest

from autoshrink.errors import AutoshrinkError
from autoshrink.store import StoreError, check_storage_url, check_store, check_study_db


def _real_study(run: Path, trials: int = 6) -> Path:
    """A real Optuna study.db with a few finished trials, and their trial records."""
    from autoshrink.recover import write_trial_record

    run.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{run / 'study.db'}", study_name="autoshrink",
                                directions=["maximize", "minimize"])
    dist = {"prune.stage1": optuna.distributions.CategoricalDistribution([0.0, 0.25, 0.5])}
    for i in range(trials):
        trial = study.ask(dist)
        trial.set_user_attr("note", "x" * 2000)  # enough rows to span several pages
        write_trial_record(run, study.tell(trial, [90.0 - i, 1.0 + i]))
    return run / "study.db"


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with a hash of its bytes (folders: "dir")."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _garbage(db: Path) -> None:
    db.write_bytes(os.urandom(8192))


def _truncate(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])


def _header_only(db: Path) -> None:
    db.write_bytes(db.read_bytes()[:100])


def _zero_pages(db: Path) -> None:
    """Overwrite everything after the first page (the schema) with zeros: the table pages go."""
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:] = bytes(len(data) - page)
    db.write_bytes(bytes(data))


def _broken_tree(db: Path) -> None:
    """Zero the cell pointers of one table page: the file opens, SQLite's own check fails."""
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[2 * page + 8: 2 * page + 40] = bytes(32)
    db.write_bytes(bytes(data))


def _directory(db: Path) -> None:
    db.unlink()
    db.mkdir()
    (db / "inside.txt").write_text("kept")


def _not_optuna(db: Path) -> None:
    db.unlink()
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE notes (x TEXT)")


def _empty(db: Path) -> None:
    db.write_bytes(b"")


@pytest.mark.parametrize("damage, message", [
    (_garbage, r"study\.db is not a database \(damaged\?\): move it away or start with a new --out; "
               r"`autoshrink recover .*run` rebuilds it from trials/ \(6 trial records\)$"),
    (_truncate, r"study\.db is not a database \(damaged\?\): move it away"),
    (_header_only, r"study\.db is not a database \(damaged\?\): move it away"),
    (_zero_pages, r"study\.db is not a database \(damaged\?\): move it away"),
    (_broken_tree, r"study\.db is damaged \(SQLite's check: On tree page \d+ .*\): move it away or start with a new "
                   r"--out; `autoshrink recover"),
    (_directory, r"study\.db is a folder, not a database file: move it away or start with a new --out$"),
    (_not_optuna, r"study\.db is an SQLite database but not an Optuna study \(no studies, trials, version_info "
                  r"table\): move it away"),
    (_empty, r"study\.db is empty \(damaged\?\): move it away or start with a new --out; `autoshrink recover"),
], ids=["garbage", "truncated", "header-only", "zeroed-pages", "broken-tree", "directory", "not-optuna", "empty"])
def test_a_damaged_study_db_is_one_line_and_nothing_changes(tmp_path, damage, message):
    db = _real_study(tmp_path / "run")
    (tmp_path / "run" / "trials.csv").write_text("number,state\n0,COMPLETE\n")
    damage(db)
    before = _snapshot(tmp_path)
    with pytest.raises(StoreError, match=message) as info:
        check_store(tmp_path / "run")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(str(db))
    assert isinstance(info.value, ValueError) and isinstance(info.value, AutoshrinkError)
    assert _snapshot(tmp_path) == before  # read only: no journal, no repair, nothing moved


def test_without_trial_records_the_message_does_not_offer_recover(tmp_path):
    db = tmp_path / "study.db"
    _garbage(db)
    with pytest.raises(StoreError, match=r"start with a new --out \(trials/ holds no records to rebuild it from\)$"):
        check_study_db(db)


def test_an_intact_study_a_missing_one_and_a_new_empty_one_pass(tmp_path):
    db = _real_study(tmp_path / "run")
    before = _snapshot(tmp_path)
    check_study_db(db)
    assert _snapshot(tmp_path) == before
    check_store(tmp_path / "nowhere")  # a run folder that does not exist yet
    check_store(tmp_path / "run", storage=None)
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "study.db").write_bytes(b"")  # being created, nothing recorded yet
    check_store(tmp_path / "fresh")


def test_an_unreadable_study_db_says_so(tmp_path, monkeypatch):
    db = _real_study(tmp_path / "run")
    if os.geteuid() != 0:  # a real permission problem (root reads anything)
        db.chmod(0)
        try:
            with pytest.raises(StoreError, match=r"study\.db is not readable \(permission denied\): fix its "):
                check_study_db(db)
        finally:
            db.chmod(0o644)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == db else real_access(p, mode, **kw))
    with pytest.raises(StoreError, match=r"study\.db is not readable \(permission denied\): fix its permissions "
                                         r"\(chmod u\+r .*study\.db\) or run as its owner$"):
        check_study_db(db)


def test_a_study_db_locked_by_a_writer_is_not_called_damaged(tmp_path, monkeypatch):
    import autoshrink.store as store

    db = _real_study(tmp_path / "run")
    monkeypatch.setattr(store, "_SQLITE_BUSY_TIMEOUT_S", 0.1)
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match=r"study\.db stayed locked by another process for 0\.1 s: wait for"):
            check_study_db(db)
    finally:
        writer.execute("ROLLBACK")
        writer.close()


# -- storage URLs ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url, message", [
    ("notaurl", r"^--storage 'notaurl' is not a database URL: write it as sqlite:///PATH/study\.db or "
                r"postgresql://USER@HOST/DB$"),
    ("", r"^--storage '' is not a database URL"),
    ("postgresq://u@h/db", r"^--storage postgresq://u@h/db: unknown database kind 'postgresq': use sqlite:///PATH"),
    ("sqlite:////nonexistent/dir/x.db", r"^--storage sqlite:////nonexistent/dir/x\.db: the folder /nonexistent/dir "
                                        r"does not exist: create it first or fix the path$"),
    ("mysql://u@localhost/db", r"^--storage mysql://u@localhost/db: no MySQL driver: pip install pymysql"),
])
def test_a_bad_storage_url_is_one_line(url, message):
    with pytest.raises(StoreError, match=message) as info:
        check_storage_url(url)
    assert "\n" not in str(info.value)


def test_postgresql_without_its_driver_names_the_extra(monkeypatch):
    for name in ("psycopg", "psycopg2"):  # as if neither driver were installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(StoreError, match=r'^--storage postgresql://u:\*\*\*@db\.example/x: no PostgreSQL driver: '
                                         r'pip install "autoshrink\[postgres\]"$'):
        check_storage_url("postgresql://u:secret@db.example/x")


def test_an_unreachable_server_is_one_line_and_hides_the_password():
    pytest.importorskip("psycopg")
    port = _free_port()  # nothing listens there
    with pytest.raises(StoreError, match=rf"^--storage postgresql://u:\*\*\*@127\.0\.0\.1:{port}/db: cannot connect "
                                         rf"to the database server at 127\.0\.0\.1:{port} within 2 s \(Connection "
                                         r"refused\): is it running, and are the host, port, user and database "
                                         r"right\?$") as info:
        check_storage_url(f"postgresql://u:secret@127.0.0.1:{port}/db", timeout_s=2)
    assert "secret" not in str(info.value)


def test_a_sqlite_url_to_a_damaged_file_is_checked_like_a_run_folder(tmp_path):
    db = _real_study(tmp_path / "run")
    _garbage(db)
    before = _snapshot(tmp_path)
    with pytest.raises(StoreError, match=r"study\.db is not a database \(damaged\?\)"):
        check_store(tmp_path / "elsewhere", storage=f"sqlite:///{db}")
    check_storage_url(f"sqlite:///{tmp_path / 'new.db'}")  # a new file in an existing folder: fine
    assert _snapshot(tmp_path) == before  # and it was not created by the check

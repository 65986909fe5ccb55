"""Per-trial records and ``autoshrink recover``: a damaged study.db is rebuilt from trials/ with
every finished trial as it was (number, state, values, params, attributes, times), the damaged
file kept aside byte for byte, and the rest of the run folder untouched."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from autoshrink.cli import main
from autoshrink.recover import (
    NOT_RECOVERED,
    read_trial_record,
    recover,
    write_study_record,
    write_trial_record,
)
from autoshrink.store import StoreError, check_study_db

DIRECTIONS = ["maximize", "minimize"]
DISTS = {
    "bits.stem": optuna.distributions.CategoricalDistribution([8, 32]),
    "prune.stage1": optuna.distributions.FloatDistribution(0.0, 0.5, step=0.25),
    "kd.temperature": optuna.distributions.FloatDistribution(1.0, 8.0, log=True),
    "finetune.steps": optuna.distributions.IntDistribution(10, 40, step=10),
}


def _study(run: Path, *, records: bool = True) -> optuna.Study:
    """A run folder's study as the driver leaves it: a complete trial with its budget constraint,
    a pruned one, a failed one with its reason, an enqueued one; each
    with its record (``records``), and the study's record."""
    run.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{run / 'study.db'}", study_name="my-study",
                                directions=DIRECTIONS)
    for key, value in {"budget": {"latency_ms": 5.0}, "space": {"layers": [{"pattern": "conv1"}]},
                       "teacher": {"accuracy": 97.2, "latency_ms": 3.1}}.items():
        study.set_user_attr(key, value)
    study.enqueue_trial({"bits.stem": 8, "prune.stage1": 0.25})
    told = []
    for i, outcome in enumerate(["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]):
        trial = study.ask(DISTS)
        trial.set_user_attr("candidate", {"bits": {"conv1": trial.params["bits.stem"]}, "prune": {}})
        trial.set_user_attr("history", [[10, 80.0 + i], [20, 85.5]])
        trial.set_user_attr("latency_ms", 4.2 + i)
        trial.set_user_attr("meets_budget", True)
        trial.set_constraint("latency_ms", -0.1 * i)
        (run / "trials" / f"{trial.number:04d}").mkdir(parents=True, exist_ok=True)
        (run / "trials" / f"{trial.number:04d}" / "candidate.json").write_text("{}")
        if outcome == "COMPLETE":
            frozen = study.tell(trial, [91.25 - i, 5.0 + i])
        elif outcome == "PRUNED":
            frozen = study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            trial.set_user_attr("error", "RuntimeError: injected")
            frozen = study.tell(trial, state=optuna.trial.TrialState.FAIL)
        told.append(frozen)
        if records:
            write_trial_record(run, frozen, {"accuracy": 91.25 - i, "latency_ms": 4.2 + i, "state": outcome})
    write_study_record(run, study_name=study.study_name, directions=study.directions, user_attrs=study.user_attrs)
    return study


def _fields(t: optuna.trial.FrozenTrial) -> dict:
    return {"number": t.number, "state": t.state, "values": t.values, "params": t.params,
            "distributions": t.distributions, "user_attrs": t.user_attrs, "system_attrs": t.system_attrs,
            "intermediate_values": t.intermediate_values, "datetime_start": t.datetime_start,
            "datetime_complete": t.datetime_complete}


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def test_recover_rebuilds_every_trial_as_it_was(tmp_path, capsys):
    run = tmp_path / "run"
    study = _study(run)
    original, attrs = [_fields(t) for t in study.get_trials()], study.user_attrs
    (run / "trials.csv").write_text("stale\n")
    garbage = os.urandom(4096)
    (run / "study.db").write_bytes(garbage)
    before = _snapshot(run)

    assert main(["recover", str(run)]) == 0
    out = capsys.readouterr().out.strip()
    moved = sorted(run.glob("study.db.damaged-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == garbage  # kept, byte for byte
    assert out == f"recovered 4 trials into {run / 'study.db'}; the damaged store is kept as {moved[0]}"
    check_study_db(run / "study.db")
    after = _snapshot(run)
    del before["study.db"], after["study.db"], after[moved[0].name]
    assert after == before  # trials/, trials.csv, study.json: untouched

    rebuilt = optuna.load_study(study_name="my-study", storage=f"sqlite:///{run / 'study.db'}")
    assert [d.name for d in rebuilt.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert rebuilt.user_attrs == attrs
    assert [_fields(t) for t in rebuilt.get_trials()] == original
    assert rebuilt.trials[3].system_attrs["constraints:latency_ms"] == pytest.approx(-0.3)  # feasibility survives
    assert rebuilt.trials[0].system_attrs["fixed_params"] == {"bits.stem": 8, "prune.stage1": 0.25}
    # the sampler can go on with it, as --resume would
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=2)  # as the driver makes it
    resumed = optuna.load_study(study_name="my-study", storage=f"sqlite:///{run / 'study.db'}", sampler=sampler)
    trial = resumed.ask(DISTS)
    assert trial.number == 4 and set(trial.params) == set(DISTS)


def test_trial_numbers_without_a_record_are_failed_so_the_others_keep_theirs(tmp_path):
    run = tmp_path / "run"
    _study(run)
    (run / "trials" / "0001" / "metrics.json").unlink()  # e.g. the trial that was running
    (run / "trials" / "0002" / "metrics.json").write_text("{torn")  # unreadable
    (run / "study.db").write_bytes(b"")  # a crash left it empty
    r = recover(run)
    assert r.trials == 2 and r.missing == (1, 2) and r.unreadable == (run / "trials" / "0002" / "metrics.json",)
    assert "; 2 without a record added as failed (1, 2); 1 unreadable record(s): " in r.summary()
    rebuilt = optuna.load_study(study_name="my-study", storage=f"sqlite:///{run / 'study.db'}")
    states = [(t.number, t.state.name, t.user_attrs.get("error")) for t in rebuilt.get_trials()]
    assert states[1] == (1, "FAIL", NOT_RECOVERED) and states[2] == (2, "FAIL", NOT_RECOVERED)
    assert states[3][:2] == (3, "COMPLETE") and rebuilt.trials[3].values == [88.25, 8.0]


def test_recover_refuses_an_intact_store_unless_forced(tmp_path, capsys):
    run = tmp_path / "run"
    _study(run)
    db = (run / "study.db").read_bytes()
    assert main(["recover", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"autoshrink: error: {run / 'study.db'} is intact: nothing to recover (pass --force to "
                   "rebuild it from trials/ anyway)")
    assert (run / "study.db").read_bytes() == db and not list(run.glob("study.db.damaged-*"))
    r = recover(run, force=True)
    assert r.trials == 4 and r.moved_to.read_bytes() == db


def test_recover_without_records_or_folder_is_one_line(tmp_path, capsys):
    assert main(["recover", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"autoshrink: error: {tmp_path / 'nope'}: no such run folder"
    run = tmp_path / "run"
    _study(run, records=False)
    (run / "study.db").write_bytes(b"garbage" * 100)
    with pytest.raises(StoreError, match=r"run: no trial records \(trials/NNNN/metrics\.json\) to rebuild study\.db"):
        recover(run)
    assert (run / "study.db").read_bytes() == b"garbage" * 100


def test_without_study_json_the_defaults_are_used(tmp_path):
    run = tmp_path / "run"
    _study(run)
    (run / "study.json").unlink()
    (run / "study.db").unlink()
    r = recover(run)
    assert r.moved_to is None and r.trials == 4
    rebuilt = optuna.load_study(study_name="autoshrink", storage=f"sqlite:///{run / 'study.db'}")
    assert len(rebuilt.trials) == 4 and rebuilt.user_attrs == {}


def test_records_are_strict_json_and_only_for_finished_trials(tmp_path):
    study = optuna.create_study(directions=DIRECTIONS)
    trial = study.ask(DISTS)
    trial.set_user_attr("accuracy_se", float("nan"))
    running = study.get_trials(deepcopy=False)[0]
    with pytest.raises(ValueError, match="trial 0 is RUNNING: only a finished trial has a record"):
        write_trial_record(tmp_path, running)
    path = write_trial_record(tmp_path, study.tell(trial, [91.0, float("inf")]), {"latency_ms": float("inf")})
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {text}"))
    back = read_trial_record(path)
    assert back.values == [91.0, math.inf]
    assert back.user_attrs["accuracy_se"] is None  # JSON has no NaN
    assert json.loads(text)["metrics"] == {"latency_ms": None}
    assert list(tmp_path.iterdir()) == [tmp_path / "trials"]  # atomic: no temporary file left
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


# -- a real search, killed, its store damaged, recovered -------------------------------------
DRIVER = """\
import os, sys

import cloudpickle

import autoshrink as ash

with open(sys.argv[1], "rb") as fh:
    task, space, budget, kwargs = cloudpickle.load(fh)
task.model.home_pid = os.getpid()  # this process is the driver now: its own forward passes never fault
ash.search(task, space, budget, **kwargs)
"""


def _hanging_task(tiny_task, hang: Path):
    """``tiny_task`` whose model hangs in a Ray worker once ``layer1`` is pruned to half (8 of 16
    channels), after leaving a file in ``hang``: the trials before it finish."""
    import autoshrink as ash

    class HangAtHalf(type(tiny_task.model)):  # local: shipped to Ray by value
        def __init__(self) -> None:
            super().__init__()
            self.home_pid, self.hang = os.getpid(), str(hang)

        def forward(self, x):
            if os.getpid() != self.home_pid and self.layer1[0].conv1.out_channels == 8:
                Path(self.hang, f"hanging-{os.getpid()}").touch()
                time.sleep(3600)
            return super().forward(x)

    model = HangAtHalf()
    model.load_state_dict(tiny_task.model.state_dict())
    return ash.Task(model=model.eval(), train_data=tiny_task.train_data, val_data=tiny_task.val_data,
                    example_input=tiny_task.example_input, name="hang-at-half")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills a process group")
def test_a_killed_search_with_a_damaged_store_is_recovered_with_every_finished_trial(tiny_task, tmp_path):
    import cloudpickle
    import pandas as pd

    import autoshrink as ash

    space = ash.SearchSpace.from_dict({
        "name": "recover",
        "layers": [{"name": "stage1", "pattern": "layer1.*", "bits": 8, "prune": [0.0, 0.25, 0.5]}],
        "distill": {"temperature": 4.0, "alpha": 0.7},
        "finetune": {"steps": 10, "lr": 0.01, "batch_size": 32},
    }, source="recover.yaml")
    hang = tmp_path / "hang"
    hang.mkdir()
    run = tmp_path / "run"
    # the int8 baselines run first, in order: pruned 0 %, 25 % (both finish, fine-tuned), 50 % (hangs)
    setup = tmp_path / "setup.pkl"
    setup.write_bytes(cloudpickle.dumps((_hanging_task(tiny_task, hang), space, ash.Budget(mmacs=1000.0), {
        "trials": 3, "workers": 1, "out": str(run), "progress": False, "latency_runs": 10,
        "early_stopping": False, "sampler": "random", "solver": False})))
    (tmp_path / "driver.py").write_text(DRIVER)
    log = tmp_path / "driver.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(setup)], stdout=fh,
                                stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not any(hang.iterdir()):
            assert proc.poll() is None, f"driver exited ({proc.returncode}) early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no trial reached the hang:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray processes, at once
        proc.wait(30)
    db = run / "study.db"
    finished = {t.number: t for t in optuna.load_study(study_name="autoshrink", storage=f"sqlite:///{db}").trials
                if t.state.is_finished()}
    assert sorted(finished) == [0, 1], log.read_text()[-3000:]
    assert all(t.state.name == "COMPLETE" and t.user_attrs["finetune_s"] > 0 for t in finished.values())
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])  # what a full disk leaves

    done = subprocess.run([sys.executable, "-m", "autoshrink.cli", "recover", str(run)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # trial 2 was running: past the last record, so no number to keep free for it
    assert done.stdout.startswith(f"recovered 2 trials into {db}; the damaged store is kept as "), done.stdout
    rebuilt = optuna.load_study(study_name="autoshrink", storage=f"sqlite:///{db}")
    for number, before in finished.items():
        after = rebuilt.trials[number]
        assert _fields(after) == _fields(before)
        for key in ("accuracy", "latency_ms", "size_mb", "mmacs", "finetune_s", "candidate"):
            assert after.user_attrs[key] == before.user_attrs[key]
        record = json.loads((run / "trials" / f"{number:04d}" / "metrics.json").read_text())
        assert record["metrics"]["accuracy"] == before.user_attrs["accuracy"]
        assert (run / "trials" / f"{number:04d}" / "candidate.json").is_file()
    assert len(rebuilt.trials) == 2
    assert rebuilt.user_attrs["budget"] == {"mmacs": 1000.0} and "teacher" in rebuilt.user_attrs
    df = ash.load(run).trials  # show / pareto / export read it again
    assert df["number"].tolist() == [0, 1] and df["accuracy"].notna().all()
    assert pd.api.types.is_numeric_dtype(df["latency_ms"])

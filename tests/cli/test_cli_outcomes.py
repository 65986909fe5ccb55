"""What the command prints last, and how it ends on an error that is not the user's."""

from __future__ import annotations

import types

import optuna
import pytest

import autoshrink as ash
import autoshrink.cli as cli
from autoshrink.cli import main
from autoshrink.finalists import DEPLOYED
from autoshrink.record import STUDY_DIRECTIONS, StudyAttr, TrialAttr
from autoshrink.result import load
from autoshrink.search.finalize import NO_TEST_SPLIT, artifact_path, finalize

BUDGET = ash.Budget(latency_ms=5.0)
TASK = types.SimpleNamespace(example_input=None, test_data=None)


def _study(out, trials):
    """A run folder with told COMPLETE trials ``(accuracy, latency_ms)`` and placeholder artifacts."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="autoshrink",
                                directions=STUDY_DIRECTIONS)
    study.set_user_attr(StudyAttr.BUDGET, BUDGET.constraints())
    for acc, lat in trials:
        t = study.ask()
        for key, value in {TrialAttr.ACCURACY: acc, TrialAttr.LATENCY_MS: lat, TrialAttr.SIZE_MB: 0.1,
                           TrialAttr.MEETS_BUDGET: True}.items():
            t.set_user_attr(key, value)
        study.tell(t, [acc, lat])
        artifact_path(out, t.number).parent.mkdir(parents=True)
        artifact_path(out, t.number).write_bytes(b"placeholder")
    return study


def _retimer(figures):
    def measure(numbers):
        return {n: {DEPLOYED: figures[n], "latency_deployed_p25_ms": figures[n] * 0.98,
                    "latency_deployed_p75_ms": figures[n] * 1.02, "latency_deployed_p90_ms": figures[n] * 1.05,
                    "latency_deployed_ci_low_ms": figures[n] * 0.99,
                    "latency_deployed_ci_high_ms": figures[n] * 1.01} for n in numbers}

    return measure


@pytest.mark.parametrize("error", [KeyError("latency_ms"), TypeError("unsupported operand"),
                                   ValueError("a library's own complaint")])
def test_an_error_that_is_not_ours_exits_1_with_its_traceback(error, monkeypatch, capsys):
    def broken(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "show", broken)
    code = main(["show", "anywhere"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and type(error).__name__ in err
    assert "internal error" in err.splitlines()[-1]


def test_the_summary_ends_with_the_warnings_and_the_noise_note(tmp_path, capsys):
    study = _study(tmp_path, [(95.0, 4.8), (94.0, 4.0)])
    finalize(TASK, study, BUDGET, tmp_path, retimer=_retimer({0: 4.95, 1: 4.1}))
    capsys.readouterr()
    assert main(["show", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    note = load(tmp_path).noise_note()
    assert note is not None
    assert " ".join(lines[-3:]).replace("  ", " ").endswith(note.split()[-1])  # the note, wrapped, is last
    text = " ".join(lines)
    assert f"warning: {NO_TEST_SPLIT[:40]}" in text
    assert text.index("warning:") > text.index("run folder:")
    assert "latency of the shipped artifact, re-timed in a fresh process: 4.950 ms" in text

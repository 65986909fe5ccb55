"""The record schema: states are Optuna's, the objectives' directions are what the study is told,
and no two constants share a key (a key read under one name and written under another is lost)."""

from __future__ import annotations

import optuna
import pytest

from autoshrink.record import (
    FINISHED_STATES,
    METRIC_ATTRS,
    OBJECTIVES,
    STUDY_DIRECTIONS,
    Direction,
    State,
    StudyAttr,
    TrialAttr,
)
from autoshrink.trial import TrialResult


def test_states_are_optunas_trial_states():
    assert {s.value for s in State} == {s.name for s in optuna.trial.TrialState}
    for state in State:
        assert state.optuna.name == state.value and state.finished == state.optuna.is_finished()
    assert FINISHED_STATES == {s for s in State if s.optuna.is_finished()}
    assert f"{State.COMPLETE}" == str(State.COMPLETE) == "COMPLETE"


def test_state_of_a_trial():
    study = optuna.create_study(directions=STUDY_DIRECTIONS)
    running = study.ask()
    study.tell(study.ask(), [90.0, 1.0])
    assert [State.of(t) for t in study.get_trials()] == [State.RUNNING, State.COMPLETE]
    assert running.number == 0


def test_objectives_and_the_directions_told_to_the_study():
    assert OBJECTIVES == {"accuracy": "max", "latency_ms": "min"}
    study = optuna.create_study(directions=STUDY_DIRECTIONS)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [Direction.parse(d) for d in STUDY_DIRECTIONS] == list(OBJECTIVES.values())


@pytest.mark.parametrize("bad", ["up", None, 1])
def test_an_unknown_direction_is_named(bad):
    with pytest.raises(ValueError, match=r"direction for objective 'x' must be one of \['max', 'min'\], but got"):
        Direction.parse(bad, column="x")


def test_keys_are_unique_and_complete():
    for keys in (StudyAttr.ALL, TrialAttr.ALL):
        assert len(keys) == len(set(keys))
    for owner in (StudyAttr, TrialAttr):
        named = {v for k, v in vars(owner).items() if k.isupper() and isinstance(v, str)}
        assert named == set(owner.ALL), owner.__name__
    # every metric a trial reports is a stored key
    assert set(METRIC_ATTRS) <= set(TrialResult().metrics())

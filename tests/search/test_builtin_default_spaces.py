"""Every built-in task's architecture searches with its default space (issue 11): no ``--space``,
one trial, COMPLETE. The teacher is the architecture untrained (tasks.blueprint) on a few digits,
and the space's fine-tune is cut to 2 steps: the layer rules, pruning and int8 path are the real ones."""

from __future__ import annotations

import optuna
import pytest
from torch.utils.data import TensorDataset

import autoshrink as ash
from autoshrink import tasks
from autoshrink.record import StudyAttr
from autoshrink.space import SearchSpace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_digits():
    from autoshrink.tasks.digits import digits_data

    data = digits_data()
    xt, yt = data.train.tensors
    xv, yv = data.val.tensors
    return TensorDataset(xt[:64], yt[:64]), TensorDataset(xv[:32], yv[:32])


# with AUTOSHRINK_HEAVY=1: each task's default space is derived always (tests/space/test_auto_space.py),
# the searches run always on the tiny task (tests/search), and resnet20 (a three-stage net no
# bundled space fits) compresses, quantizes and lowers always (tests/test_conformance.py)
@pytest.mark.heavy
@pytest.mark.parametrize("name", tasks.list_tasks())
def test_built_in_architecture_searches_with_its_default_space(name, shared_ray, no_finalize, tiny_digits, tmp_path,
                                                               monkeypatch):
    real_default = SearchSpace.default.__func__

    def short_default(cls):  # the bundled default (and the auto spaces built on it), 2 fine-tune steps
        d = real_default(cls).to_dict()
        d["finetune"] = dict(d["finetune"], steps=2, batch_size=16)
        return cls.from_dict(d, source="default.yaml (2 fine-tune steps)")

    monkeypatch.setattr(SearchSpace, "default", classmethod(short_default))
    model, x = tasks.blueprint(name)
    train, val = tiny_digits
    task = ash.Task(model=model, train_data=train, val_data=val, example_input=x, name=name)
    result = ash.search(task, None, ash.Budget(size_mb=100), trials=1, workers=1, out=tmp_path / "run",
                        latency_runs=1, enqueue_baselines=False, early_stopping=False, progress=False)
    df = result.trials
    assert df["state"].tolist() == ["COMPLETE"], df["error"].tolist()
    assert 0 <= df["accuracy"].iloc[0] <= 100
    study = optuna.load_study(study_name="autoshrink", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    expected = "default.yaml" if name == "digits" else "auto:"
    assert expected in study.user_attrs[StudyAttr.SPACE_SOURCE]

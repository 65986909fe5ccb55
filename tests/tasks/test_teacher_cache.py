"""cached_teacher: train once, then load; a damaged entry is refused or retrained, never trusted."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from autoshrink.task import TaskError
from autoshrink.tasks._teacher_cache import cached_teacher


def _build() -> nn.Module:
    return nn.Linear(3, 2)


def _trainer(calls: list):
    def train(model: nn.Module) -> float:
        calls.append(model)
        with torch.no_grad():
            model.weight.fill_(0.5)
        return 91.0

    return train


def test_trains_once_then_loads(tmp_path):
    path = tmp_path / "teachers" / "t.pt"
    calls: list = []
    model, acc = cached_teacher(path, _build, _trainer(calls))
    assert acc == 91.0 and len(calls) == 1 and not model.training and path.is_file()
    again, acc2 = cached_teacher(path, _build, _trainer(calls))
    assert len(calls) == 1 and acc2 == 91.0  # loaded, not trained
    assert torch.equal(again.weight, torch.full((2, 3), 0.5))
    assert set(torch.load(path, weights_only=True)) == {"model", "accuracy", "tag", "train_s"}


def test_a_damaged_entry_is_refused_by_default(tmp_path):
    path = tmp_path / "t.pt"
    path.write_bytes(b"not a checkpoint")
    calls: list = []
    with pytest.raises(TaskError, match=r"t\.pt cannot be loaded safely .*delete it"):
        cached_teacher(path, _build, _trainer(calls))
    assert calls == [] and path.read_bytes() == b"not a checkpoint"


def test_a_damaged_entry_can_be_retrained(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"model": {"weight": torch.zeros(5, 5)}, "accuracy": 1.0}, path)  # wrong shapes
    calls: list = []
    model, acc = cached_teacher(path, _build, _trainer(calls), retrain_damaged=True)
    assert len(calls) == 1 and acc == 91.0
    assert float(torch.load(path, weights_only=True)["accuracy"]) == 91.0

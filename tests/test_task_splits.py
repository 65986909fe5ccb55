"""Task: the optional test split, and metrics that must be finite."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from autoshrink import Task, TaskError


def _task(**kw):
    ds = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    return Task(model=nn.Linear(4, 2), train_data=ds, val_data=ds, example_input=torch.randn(1, 4), **kw)


def test_task_scores_the_test_split_only_when_asked():
    test = TensorDataset(torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
    task = _task(test_data=test)
    model = lambda x: torch.stack([torch.ones(len(x)), torch.zeros(len(x))], 1)  # noqa: E731  always class 0
    acc, se = task.evaluate(model, split="test")
    assert acc == 100.0 and se == 0.0
    assert task.evaluate(model)[0] == task.evaluate(model, split="val")[0]


def test_task_test_split_errors():
    with pytest.raises(TaskError, match="has no test data; pass test_data="):
        _task().evaluate(lambda x: x[:, :2], split="test")
    with pytest.raises(TaskError, match="split must be one of 'train', 'val', 'test', got 'dev'"):
        _task().evaluate(lambda x: x[:, :2], split="dev")
    with pytest.raises(TaskError, match="test_data is empty"):
        _task(test_data=TensorDataset(torch.randn(0, 4), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(TaskError, match="test_data must be a torch Dataset or DataLoader, got list"):
        _task(test_data=[1, 2])


def test_a_nan_metric_is_an_error_not_a_score():
    def flaky(logits, targets):
        return float("nan")

    with pytest.raises(TaskError, match=r"task 'custom': the metric flaky returned nan on 8 val samples "
                                        r"\(logits finite: True\); a metric must return a finite number"):
        _task(metric=flaky).evaluate(lambda x: x[:, :2])

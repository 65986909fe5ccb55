"""The digits task's held-out data: validation and test from disjoint original digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from autoshrink.tasks import digits


@pytest.fixture(scope="module")
def data():
    return digits.digits_data()


def test_validation_test_and_training_share_no_original_digit(data):
    train, val, test = (set(d.tolist()) for d in (data.train_digits, data.val_digits, data.test_digits))
    assert not val & test
    assert not train & val and not train & test
    assert len(val) == 225 and len(test) == 225 and len(train) == 1347
    assert len(data.val) == len(data.val_digits) == 225 * digits.VAL_COPIES
    assert len(data.test) == len(data.test_digits) == 225 * digits.TEST_COPIES


def test_each_sample_carries_its_source_digit(data):
    from sklearn.datasets import load_digits

    target = torch.as_tensor(load_digits().target)
    for ds, idx in ((data.train, data.train_digits), (data.val, data.val_digits), (data.test, data.test_digits)):
        assert torch.equal(ds.tensors[1], target[idx])


def test_split_is_stratified_and_deterministic(data):
    val_counts = np.bincount(data.val.tensors[1][:225].numpy(), minlength=10)
    test_counts = np.bincount(data.test.tensors[1][:225].numpy(), minlength=10)
    assert np.abs(val_counts - test_counts).max() <= 1
    again = digits.digits_data()
    assert torch.equal(again.test.tensors[0], data.test.tensors[0])
    assert torch.equal(again.val_digits, data.val_digits)
    # validation and test samples are distorted with different seeds, not the same noise
    assert not torch.equal(data.val.tensors[0][:225], data.test.tensors[0][:225])


def test_cached_teacher_from_an_older_split_is_rescored_not_retrained(tmp_path, monkeypatch):
    from autoshrink import models

    def no_training(*args, **kwargs):
        raise AssertionError("the teacher trains on the training split alone: its cache stays valid")

    torch.manual_seed(0)
    small = [TensorDataset(torch.randn(16, 1, 32, 32), torch.randint(0, 10, (16,))) for _ in range(3)]
    monkeypatch.setenv("AUTOSHRINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digits, "train_teacher", no_training)
    monkeypatch.setattr(digits, "digits_data", lambda: digits.DigitsData(*small))
    teacher = models.create("resnet20", num_classes=10, in_chans=1)
    path = digits._teacher_path("resnet20", 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": teacher.state_dict(), "accuracy": 123.0, "train_s": 1.0}, path)  # no split tag
    task = digits.digits_task("resnet20", epochs=1, progress=False)
    assert task.teacher_accuracy != 123.0
    assert task.teacher_accuracy == pytest.approx(task.evaluate(task.model)[0])
    saved = torch.load(path, weights_only=True)
    assert saved["tag"] == f"split-{digits.SPLIT_VERSION}" and saved["accuracy"] == task.teacher_accuracy
    assert task.test_data is small[2]
    assert "disjoint held-out digits" in task.description


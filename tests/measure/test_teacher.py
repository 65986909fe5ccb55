"""measure_teacher: the teacher's figures, with exact static cost and real (compiled and eager) timings."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from autoshrink import Task
from autoshrink.measure.teacher import measure_teacher


def test_teacher_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSHRINK_LOCK_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    data = TensorDataset(torch.randn(40, 1, 4, 4), torch.randint(0, 4, (40,)))
    task = Task(model=model, train_data=data, val_data=data, example_input=data[0][0].unsqueeze(0),
                teacher_accuracy=75.0)
    figures = measure_teacher(task, latency_runs=3)
    assert set(figures) == {"accuracy", "accuracy_se", "latency_ms", "latency_ms_eager", "size_mb", "mmacs", "params",
                            "runtime", "runtime_version", "latency_threads"}
    assert figures["runtime"] == "inductor" and figures["runtime_version"] == torch.__version__
    assert figures["accuracy"] == 75.0
    assert math.isclose(figures["accuracy_se"], 100 * math.sqrt(0.75 * 0.25 / 40))  # binomial, 40 samples
    assert figures["params"] == 16 * 4 + 4
    assert math.isclose(figures["size_mb"], (16 * 4 + 4) * 4 / 1e6)  # fp32
    assert math.isclose(figures["mmacs"], 16 * 4 / 1e6)
    assert figures["latency_ms"] > 0 and figures["latency_ms_eager"] > 0

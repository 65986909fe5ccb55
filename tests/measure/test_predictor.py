"""The latency predictor's table: one entry per distinct layer, summed, measured once per machine
(the timing itself is replaced by a fake here; experiments/bench_overhead.py checks real figures)."""

from __future__ import annotations

import torch
import torch.nn as nn

from autoshrink import Candidate
from autoshrink.measure.predictor import LatencyPredictor, layer_inputs


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, 1)
        self.conv2 = nn.Conv2d(16, 32, 3, 2, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _fake_timer(monkeypatch, calls):
    def fake(self, model, x):
        calls.append(tuple(x.shape))
        return 0.1 + x.numel() / 1000  # grows with the input; the empty model costs 0.108

    monkeypatch.setattr(LatencyPredictor, "_time", fake)


def test_layer_inputs_sees_every_layer_with_its_input_shape():
    shapes = {n: s for n, (_, s) in layer_inputs(_Net(), torch.randn(4, 1, 8, 8)).items()}
    assert shapes == {"conv1": (1, 1, 8, 8), "conv2": (1, 16, 8, 8), "fc": (1, 32)}


def test_prediction_is_the_call_cost_plus_each_layer_and_is_cached(tmp_path, monkeypatch):
    calls = []
    _fake_timer(monkeypatch, calls)
    path = tmp_path / "table.json"
    pred = LatencyPredictor(path)
    x = torch.randn(1, 1, 8, 8)
    full = pred.predict(_Net(), Candidate.uniform(bits=8), x)
    empty = 0.1 + 8 / 1000
    expected = empty + sum(0.1 + n / 1000 - empty for n in (64, 16 * 64, 32))
    assert abs(full - expected) < 1e-9
    assert len(pred.table) == 4 and path.is_file() and len(calls) == 4
    again = LatencyPredictor(path)  # another process on the same machine: nothing re-measured
    assert abs(again.predict(_Net(), Candidate.uniform(bits=8), x) - full) < 1e-9
    assert len(calls) == 4
    again.predict(_Net(), Candidate.uniform(bits=32), x)  # fp32 layers are other entries
    assert len(calls) == 7 and sorted(k[-2:] for k in again.table if k != "call") == ["q0"] * 3 + ["q1"] * 3


def test_pruning_changes_the_keys(tmp_path, monkeypatch):
    calls = []
    _fake_timer(monkeypatch, calls)
    pred = LatencyPredictor(tmp_path / "t.json")
    x = torch.randn(1, 1, 8, 8)
    dense = pred.predict(_Net(), Candidate.uniform(bits=8), x)
    pruned = pred.predict(_Net(), Candidate.uniform(bits=8, prune=0.5), x)
    assert pruned < dense
    assert any(k.startswith("conv:1:8:") for k in pred.table)

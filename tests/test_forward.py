"""run_with_hooks: one forward pass with hooks, in eval mode, leaving no hook and no mode change behind."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from autoshrink._forward import run_with_hooks


def test_hooks_see_the_pass_and_are_removed():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    seen: list = []
    out = run_with_hooks(
        net, torch.randn(1, 3),
        forward={net[0]: lambda m, inp, o: seen.append(("out", tuple(o.shape)))},
        pre={net[2]: lambda m, inp: seen.append(("in", tuple(inp[0].shape), m.training))},
    )
    assert seen == [("out", (1, 4)), ("in", (1, 4), False)]  # eval mode: BatchNorm takes batch 1
    assert out.shape == (1, 2) and not out.requires_grad
    assert net.training  # mode restored
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_hooks_are_removed_when_the_model_raises():
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            self.fc(x)
            raise RuntimeError("boom")

    net = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        run_with_hooks(net, torch.randn(1, 2), forward={net.fc: lambda *a: None})
    assert not net.fc._forward_hooks and net.training

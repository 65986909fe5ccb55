"""Structured pruning: requested ratios become real channel counts; couplings stay consistent."""

from __future__ import annotations

import torch
import torch.nn as nn

from autoshrink import Candidate
from autoshrink.compress import compress
from autoshrink.compress.prune import find_head, prune_


def _net():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def test_ratio_becomes_channel_count():
    m, x = _net(), torch.randn(1, 1, 8, 8)
    report = prune_(m, Candidate(prune={"0": 0.25, "3": 0.5}), x)
    assert m[0].out_channels == 24 and m[1].num_features == 24
    assert m[3].in_channels == 24 and m[3].out_channels == 32
    assert m[8].in_features == 32 and m[8].out_features == 10  # the head keeps its classes
    assert report.params_after < report.params_before
    by_name = {c.layer: c for c in report.layers}
    assert (by_name["0"].before, by_name["0"].after) == (32, 24)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_round_to_keeps_multiples():
    m, x = _net(), torch.randn(1, 1, 8, 8)
    prune_(m, Candidate(prune={"*": 0.3}, round_to=8), x)
    assert m[0].out_channels % 8 == 0 and m[3].out_channels % 8 == 0


def test_head_is_found_and_never_pruned():
    m, x = _net(), torch.randn(1, 1, 8, 8)
    assert find_head(m, x) == "8"
    prune_(m, Candidate.uniform(prune=0.5), x)
    assert m[8].out_features == 10


def test_residual_coupling_is_consistent(tiny_task):
    comp = compress(tiny_task.model, Candidate(prune={"layer2.*": 0.5}, round_to=None),
                    tiny_task.example_input)
    m = comp.pruned
    block = m.layer2[0]
    # conv2 and the shortcut feed one add: they must keep the same channels
    assert block.conv2.out_channels == block.shortcut[0].out_channels == 16
    assert m.fc.in_features == 16
    assert m(torch.randn(3, 1, 32, 32)).shape == (3, 10)
    # the teacher is untouched
    assert tiny_task.model.layer2[0].conv2.out_channels == 32


def test_parameter_count_follows_ratio(tiny_task):
    for ratio in (0.25, 0.5):
        comp = compress(tiny_task.model, Candidate.uniform(prune=ratio, bits=32), tiny_task.example_input)
        for change in comp.prune_report.layers:
            expected = round(change.before * (1 - ratio))
            assert abs(change.after - expected) <= 1, change

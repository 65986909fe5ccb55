"""Operators fvcore cannot count are listed, and the MACs then read "at least"."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoshrink.measure.flops import mmacs_text, model_cost


class Attention(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, 4)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(F.scaled_dot_product_attention(q, k, v)).mean(1)


def test_attention_is_listed_as_uncounted():
    cost = model_cost(Attention(), torch.randn(1, 8, 16), {"qkv": 8, "proj": 8})
    assert cost.uncounted_ops == {"aten::scaled_dot_product_attention": 1}
    assert cost.mmacs_is_lower_bound
    # the linears alone: 8 tokens x (16 x 48 + 16 x 4) MACs
    assert cost.mmacs * 1e6 == 8 * (16 * 48 + 16 * 4)
    assert mmacs_text(cost.mmacs, cost.uncounted_ops).startswith("at least ")


def test_convnet_counts_everything():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    cost = model_cost(model, torch.randn(1, 1, 8, 8), {"0": 8, "5": 8})
    assert cost.uncounted_ops == {}
    assert not cost.mmacs_is_lower_bound
    assert mmacs_text(cost.mmacs, cost.uncounted_ops) == f"{cost.mmacs:.2f}"

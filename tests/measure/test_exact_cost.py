"""model_cost on a model small enough to count by hand: exact MACs, BOPs, params and bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from autoshrink.measure.flops import model_cost

# Conv2d(1, 4, 3) on a 1x6x6 input -> 4x4x4 output; Flatten -> 64; Linear(64, 10).
CONV_MACS = 4 * 4 * 4 * (1 * 3 * 3)  # output elements x MACs per element = 576
FC_MACS = 64 * 10  # = 640
CONV_W, CONV_B = 4 * 1 * 3 * 3, 4  # 36 weights, 4 biases
FC_W, FC_B = 64 * 10, 10  # 640 weights, 10 biases


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(64, 10))


def _bytes(conv_bits: int, fc_bits: int) -> float:
    def layer(w: int, b: int, out_channels: int, bits: int) -> float:
        if bits == 32:
            return (w + b) * 4
        return w * bits / 8 + out_channels * 4 + b * 4  # packed weights, fp32 scale per channel, fp32 bias

    return layer(CONV_W, CONV_B, 4, conv_bits) + layer(FC_W, FC_B, 10, fc_bits)


@pytest.mark.parametrize(("conv_bits", "fc_bits"), [(32, 32), (8, 32), (8, 8), (4, 8)])
def test_cost_matches_the_hand_count(conv_bits, fc_bits):
    cost = model_cost(_model(), torch.randn(1, 1, 6, 6), {"0": conv_bits, "2": fc_bits})

    def act(bits: int) -> int:  # activations are 8-bit where the layer is quantized
        return 8 if bits < 32 else 32

    assert cost.mmacs == pytest.approx((CONV_MACS + FC_MACS) / 1e6, rel=1e-12)
    assert cost.layer_macs == {"0": CONV_MACS, "2": FC_MACS}
    assert cost.bops == CONV_MACS * conv_bits * act(conv_bits) + FC_MACS * fc_bits * act(fc_bits)
    assert cost.params == CONV_W + CONV_B + FC_W + FC_B == 690
    assert cost.size_mb == pytest.approx(_bytes(conv_bits, fc_bits) / 1e6, rel=1e-12)


def test_the_hand_count_itself():
    # the figures above, spelled out once: 8-bit conv, fp32 linear
    assert CONV_MACS * 8 * 8 + FC_MACS * 32 * 32 == 692_224
    assert _bytes(8, 32) == 36 + 16 + 16 + 2600 == 2668


def test_a_batch_counts_per_sample():
    one = model_cost(_model(), torch.randn(1, 1, 6, 6), {"0": 8, "2": 8})
    many = model_cost(_model(), torch.randn(5, 1, 6, 6), {"0": 8, "2": 8})
    assert many == one

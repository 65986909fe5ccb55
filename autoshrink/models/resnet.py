"""ResNets for 32x32 inputs: ResNet-18 with a CIFAR stem, and the CIFAR ResNet-20.

Shortcuts that change shape are 1x1 conv + BN projections (never zero-padding), so every residual
add is a plain channel coupling that structured pruning can follow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._registry import register_model

__all__ = ["BasicBlock", "ResNet", "resnet18_32", "resnet20"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual add; ``shortcut`` projects when the shape changes.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        stride: stride of the first conv (and of the projection).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to an ``(N, C, H, W)`` tensor."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of :class:`BasicBlock` stages with a 3x3 stride-1 stem and no max-pool.

    Module names: ``conv1``, ``bn1``, ``layer{i}.{j}.conv1|bn1|conv2|bn2``,
    ``layer{i}.{j}.shortcut.0`` (projection conv, where present), ``fc``.

    Args:
        depths: blocks per stage.
        widths: output channels per stage (the stem has ``widths[0]``).
        num_classes: outputs of the ``fc`` head.
        in_chans: input image channels.
    """

    classifier_name = "fc"

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_chans: int = 1,
    ) -> None:
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(
                f"`depths` and `widths` must have the same length, but got "
                f"depths={list(depths)} and widths={list(widths)}."
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_chs = widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(in_chs, width, stride if j == 0 else 1))
                in_chs = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(depths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, in_chans, 32, 32)`` images to ``(N, num_classes)`` logits."""
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_model
def resnet18_32(num_classes: int = 10, in_chans: int = 1) -> ResNet:
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool, widths 64-512 (~11.2M params).

    Example:
        >>> resnet18_32()(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes=num_classes, in_chans=in_chans)


@register_model
def resnet20(num_classes: int = 10, in_chans: int = 1) -> ResNet:
    """CIFAR ResNet-20: three stages of three blocks, widths 16/32/64, projection shortcuts.

    Example:
        >>> resnet20()(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    return ResNet((3, 3, 3), (16, 32, 64), num_classes=num_classes, in_chans=in_chans)

"""A small DenseNet-BC for 32x32 inputs.

Each dense layer concatenates its new features onto its input, so one conv's output channels
feed every later BN/conv of the block through ``torch.cat``: the concat coupling that
structured pruning has to track.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._registry import register_model

__all__ = ["DenseLayer", "DenseNet", "Transition", "densenet_tiny_32"]


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bottleneck) then BN-ReLU-3x3 conv; returns ``cat([x, new], dim=1)``.

    Args:
        in_chs: input channels.
        growth_rate: channels added by this layer.
        bn_size: bottleneck width as a multiple of ``growth_rate``.
    """

    def __init__(self, in_chs: int, growth_rate: int, bn_size: int = 4) -> None:
        super().__init__()
        mid_chs = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, growth_rate, 3, padding=1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Append ``growth_rate`` new channels to ``x``."""
        new = self.conv1(self.relu(self.norm1(x)))
        new = self.conv2(self.relu(self.norm2(new)))
        return torch.cat((x, new), dim=1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv to ``out_chs`` channels, then 2x2 average pooling.

    Args:
        in_chs: input channels.
        out_chs: output channels.
    """

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_chs)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compress channels and halve the resolution."""
        return self.pool(self.conv(self.relu(self.norm(x))))


class DenseNet(nn.Module):
    """DenseNet-BC: stem conv, dense blocks separated by transitions, BN-ReLU, pool, Linear.

    Module names: ``conv_stem``, ``block{i}.{j}.norm1|conv1|norm2|conv2``,
    ``trans{i}.norm|conv``, ``norm_final``, ``fc``.

    Args:
        block_config: dense layers per block.
        growth_rate: channels each dense layer adds.
        compression: transition output channels as a fraction of their input.
        num_classes: outputs of the ``fc`` head.
        in_chans: input image channels.
    """

    classifier_name = "fc"

    def __init__(
        self,
        block_config: Sequence[int] = (4, 4, 4),
        growth_rate: int = 12,
        compression: float = 0.5,
        num_classes: int = 10,
        in_chans: int = 1,
    ) -> None:
        super().__init__()
        if not 0 < compression <= 1:
            raise ValueError(f"`compression` must be in (0, 1], but got {compression}.")
        self.num_classes = num_classes
        self.in_chans = in_chans
        chs = 2 * growth_rate
        self.conv_stem = nn.Conv2d(in_chans, chs, 3, padding=1, bias=False)
        self.num_blocks = len(block_config)
        for i, num_layers in enumerate(block_config):
            layers = []
            for _ in range(num_layers):
                layers.append(DenseLayer(chs, growth_rate))
                chs += growth_rate
            self.add_module(f"block{i + 1}", nn.Sequential(*layers))
            if i < self.num_blocks - 1:
                out_chs = int(chs * compression)
                self.add_module(f"trans{i + 1}", Transition(chs, out_chs))
                chs = out_chs
        self.norm_final = nn.BatchNorm2d(chs)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chs, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, in_chans, 32, 32)`` images to ``(N, num_classes)`` logits."""
        x = self.conv_stem(x)
        for i in range(1, self.num_blocks + 1):
            x = getattr(self, f"block{i}")(x)
            if i < self.num_blocks:
                x = getattr(self, f"trans{i}")(x)
        x = self.relu(self.norm_final(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model
def densenet_tiny_32(num_classes: int = 10, in_chans: int = 1) -> DenseNet:
    """Small DenseNet-BC for 32x32 inputs: 3 dense blocks of 4 layers, growth 12, compression 0.5.

    Example:
        >>> densenet_tiny_32()(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    return DenseNet((4, 4, 4), growth_rate=12, num_classes=num_classes, in_chans=in_chans)

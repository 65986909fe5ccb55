"""MobileNetV2 at width 0.5, with strides adapted to 32x32 inputs.

Inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear projection) exercise the
depthwise coupling (``groups == channels``) that structured pruning must keep consistent.
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import register_model

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenetv2_32"]

# (expand ratio t, output channels c at width 1.0, repeats n, first stride s). The ImageNet
# table, with the stem and the second stage at stride 1 so 32x32 inputs end at 4x4, not 1x1.
_CIFAR_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never more than 10% below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 block: ``conv_pw`` (1x1 expand) -> ``conv_dw`` (3x3 depthwise) -> ``conv_pwl``.

    The expansion (``conv_pw``/``bn1``) is absent when ``expand_ratio == 1``; the residual add is
    used when the stride is 1 and the channel count is unchanged.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        stride: stride of the depthwise conv.
        expand_ratio: hidden channels = ``in_chs * expand_ratio``.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        mid_chs = in_chs * expand_ratio
        self.has_residual = stride == 1 and in_chs == out_chs
        self.conv_pw: nn.Conv2d | None = None
        self.bn1: nn.BatchNorm2d | None = None
        if expand_ratio != 1:
            self.conv_pw = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid_chs)
        self.conv_dw = nn.Conv2d(
            mid_chs, mid_chs, 3, stride=stride, padding=1, groups=mid_chs, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv_pwl = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to an ``(N, C, H, W)`` tensor."""
        out = x
        if self.conv_pw is not None and self.bn1 is not None:
            out = self.act(self.bn1(self.conv_pw(out)))
        out = self.act(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(out))
        return out + x if self.has_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs.

    Module names: ``conv_stem``, ``bn1``, ``blocks.{stage}.{block}.conv_pw|conv_dw|conv_pwl``,
    ``conv_head``, ``bn2``, ``classifier``.

    Args:
        width_mult: multiplier on every channel count except ``head_chs``.
        head_chs: channels of the final 1x1 conv before pooling.
        num_classes: outputs of the ``classifier`` head.
        in_chans: input image channels.
    """

    classifier_name = "classifier"

    def __init__(
        self,
        width_mult: float = 0.5,
        head_chs: int = 640,
        num_classes: int = 10,
        in_chans: int = 1,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"`width_mult` must be > 0, but got {width_mult}.")
        self.num_classes = num_classes
        self.in_chans = in_chans
        stem_chs = _make_divisible(32 * width_mult)
        self.conv_stem = nn.Conv2d(in_chans, stem_chs, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act = nn.ReLU6()
        in_chs = stem_chs
        stages = []
        for t, c, n, s in _CIFAR_SETTINGS:
            out_chs = _make_divisible(c * width_mult)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(in_chs, out_chs, s if i == 0 else 1, t))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(in_chs, head_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head_chs)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head_chs, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, in_chans, 32, 32)`` images to ``(N, num_classes)`` logits."""
        x = self.act(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = self.act(self.bn2(self.conv_head(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


@register_model
def mobilenetv2_32(num_classes: int = 10, in_chans: int = 1) -> MobileNetV2:
    """MobileNetV2 (width 0.5, ReLU6) for 32x32 inputs: stride-1 stem, 640-channel head conv.

    Example:
        >>> mobilenetv2_32()(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    return MobileNetV2(width_mult=0.5, head_chs=640, num_classes=num_classes, in_chans=in_chans)

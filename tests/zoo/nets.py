"""A zoo of tiny models, one per architecture pattern that public model code uses and that broke
compression (issue 11). Inputs are 1x1x32x32 (the digits task), widths are tiny.

Each pattern is written the way public code writes it (torchvision / timm / Hugging Face), not
in a form that happens to suit torch-pruning.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNet channel shuffle: view → transpose → view."""
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


# (a) dual path (DPN): a fixed-width slice feeds a residual add, the rest a dense concat
class DualPathBlock(nn.Module):
    def __init__(self, cin: int, res: int, dense: int) -> None:
        super().__init__()
        self.res = res  # fixed width, as DPN's `num_1x1_c`
        self.conv1 = _cbr(cin, 16, 1)
        self.conv2 = _cbr(16, 16, 3)
        self.conv3 = nn.Conv2d(16, res + dense, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.conv2(self.conv1(x)))
        resid = x[:, : self.res] + y[:, : self.res]
        return torch.cat([resid, x[:, self.res:], y[:, self.res:]], dim=1)


class DualPathNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(1, 24, 3, 2)
        self.block1 = DualPathBlock(24, 16, 8)  # 24 -> 32
        self.block2 = DualPathBlock(32, 16, 8)  # 32 -> 40
        self.fc = nn.Linear(40, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# (b) ShuffleNet v1 unit: grouped 1x1, shuffle, depthwise, grouped 1x1, concat with pooled shortcut
class ShuffleV1Unit(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int = 2) -> None:
        super().__init__()
        mid = cout // 2
        self.groups = groups
        self.gconv1 = _cbr(cin, mid, 1, groups=groups)
        self.dwconv = nn.Sequential(nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), nn.BatchNorm2d(mid))
        self.gconv2 = nn.Sequential(nn.Conv2d(mid, cout - cin, 1, groups=groups, bias=False),
                                    nn.BatchNorm2d(cout - cin))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = channel_shuffle(self.gconv1(x), self.groups)
        y = self.gconv2(self.dwconv(y))
        return F.relu(torch.cat([F.avg_pool2d(x, 3, 2, 1), y], dim=1))


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(1, 16, 3, 1)
        self.unit1 = ShuffleV1Unit(16, 32)
        self.unit2 = ShuffleV1Unit(32, 64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.unit2(self.unit1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# (c) grouped conv with a channel multiplier: groups=in, out=2*in
class MultiplierNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(1, 16, 3, 2)
        self.dw = _cbr(16, 32, 3, 1, groups=16)  # each input channel makes two outputs
        self.pw = _cbr(32, 32, 1)
        self.dw2 = _cbr(32, 64, 3, 2, groups=32)
        self.pw2 = _cbr(64, 32, 1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw2(self.dw2(self.pw(self.dw(self.stem(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# (d) ShuffleNetV2 (torchvision's InvertedResidual): split, branch, concat, shuffle in every block
class ShuffleV2Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        else:
            self.branch1 = nn.Sequential()
        bin_ = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            nn.Conv2d(bin_, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, blocks: int = 2) -> None:
        super().__init__()
        self.stem = _cbr(1, 16, 3, 2)
        layers = [ShuffleV2Block(16, 32, 2)] + [ShuffleV2Block(32, 32, 1) for _ in range(blocks)]
        layers += [ShuffleV2Block(32, 64, 2)] + [ShuffleV2Block(64, 64, 1) for _ in range(blocks)]
        self.stages = nn.Sequential(*layers)
        self.conv5 = _cbr(64, 64, 1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.stem(x)))
        return self.fc(x.mean([2, 3]))


# (e) separate q/k/v attention, the Hugging Face BERT/ViT layout (ViTSelfAttention)
class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(hidden, self.all_head_size)
        self.key = nn.Linear(hidden, self.all_head_size)
        self.value = nn.Linear(hidden, self.all_head_size)

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        new_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(new_shape).permute(0, 2, 1, 3)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q = self.transpose_for_scores(self.query(hidden_states))
        k = self.transpose_for_scores(self.key(hidden_states))
        v = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.attention_head_size**0.5
        ctx = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size()[:-2] + (self.all_head_size,))


class ViTLayer(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(hidden)
        self.attention = SelfAttention(hidden, heads)
        self.output = nn.Linear(hidden, hidden)
        self.layernorm_after = nn.LayerNorm(hidden)
        self.intermediate = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.output(self.attention(self.layernorm_before(x)))
        return x + self.out(F.gelu(self.intermediate(self.layernorm_after(x))))


class QKVViT(nn.Module):
    def __init__(self, num_classes: int = 10, hidden: int = 32, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, hidden, 8, 8)  # 16 patches
        self.pos = nn.Parameter(torch.zeros(1, 16, hidden))
        self.layers = nn.ModuleList([ViTLayer(hidden, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.classifier(self.norm(x).mean(1))


# (f) Linear -> GELU MLP
class GeluMLP(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32 * 32, 64)
        self.act1 = nn.GELU()
        self.fc2 = nn.Linear(64, 64)
        self.act2 = nn.GELU()
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x.flatten(1))))))


# (g) padding="same" convolutions (EfficientNet in Hugging Face / TF ports)
class SamePadNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding="same", bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 5, padding="same", bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean([2, 3]))


# (h) MobileViT-like: unfold to patches with a fixed width
class PatchBlock(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int = 2) -> None:
        super().__init__()
        self.dim, self.patch = dim, patch  # fixed widths, as MobileViT's config
        self.conv_kxk = _cbr(channels, channels, 3)
        self.conv_1x1 = nn.Conv2d(channels, dim, 1, bias=False)
        self.mixer = nn.Linear(dim, dim)
        self.conv_proj = _cbr(dim, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_1x1(self.conv_kxk(x))
        b, _, h, w = y.shape
        p = self.patch
        # (B, dim, H, W) -> (B*p*p, N, dim), written with the configured width as MobileViT does
        patches = y.reshape(b * self.dim * (h // p), p, w // p, p).transpose(1, 2)
        patches = patches.reshape(b, self.dim, (h // p) * (w // p), p * p).permute(0, 3, 2, 1)
        patches = patches + self.mixer(patches)
        y = patches.permute(0, 3, 2, 1).reshape(b * self.dim * (h // p), w // p, p, p).transpose(1, 2)
        y = y.reshape(b, self.dim, h, w)
        return x + self.conv_proj(y)


class MobileViTLike(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(1, 16, 3, 2)
        self.conv = _cbr(16, 32, 3, 2)
        self.block = PatchBlock(32, 24)
        self.head_conv = _cbr(32, 64, 1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_conv(self.block(self.conv(self.stem(x))))
        return self.fc(x.mean([2, 3]))


# (i) Swin-like: channels-last LayerNorm over a fixed width, patch merging
class PatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b = x.shape[0]
        x = x.view(b, h, w, self.dim)  # Swin's fixed width
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * self.dim)))


class SwinLike(nn.Module):
    def __init__(self, num_classes: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, 4, 4)  # 8x8 tokens
        self.norm0 = nn.LayerNorm(dim)
        self.mlp1 = nn.Linear(dim, 2 * dim)
        self.mlp2 = nn.Linear(2 * dim, dim)
        self.merge = PatchMerging(dim)
        self.mlp3 = nn.Linear(2 * dim, 4 * dim)
        self.mlp4 = nn.Linear(4 * dim, 2 * dim)
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm0(self.patch_embed(x).flatten(2).transpose(1, 2))
        x = x + self.mlp2(F.gelu(self.mlp1(x)))
        x = self.merge(x, 8, 8)
        x = x + self.mlp4(F.gelu(self.mlp3(x)))
        return self.head(self.norm(x).mean(1))


ZOO: dict[str, tuple[type[nn.Module], str]] = {
    "dual_path": (DualPathNet, "fixed-width channel slice + add + concat (DPN)"),
    "shufflenet_v1": (ShuffleNetV1, "grouped 1x1 + channel shuffle + concat with pooled shortcut"),
    "multiplier": (MultiplierNet, "grouped conv with a channel multiplier (groups=in, out=2*in)"),
    "shufflenet_v2": (ShuffleNetV2, "channel split + concat + shuffle in every block"),
    "qkv_vit": (QKVViT, "separate query/key/value Linears with num_attention_heads (HF ViT/BERT)"),
    "gelu_mlp": (GeluMLP, "Linear -> GELU MLP"),
    "same_pad": (SamePadNet, 'padding="same" convs'),
    "mobilevit_like": (MobileViTLike, "reshape to patches at a fixed width"),
    "swin_like": (SwinLike, "LayerNorm / view over a fixed width (patch merging)"),
}


def create(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ZOO[name][0]().eval()


class ShuffleNetV2Deep(nn.Module):
    """torchvision's ShuffleNetV2 depth (stages of 4, 8, 4 blocks) at x0.5 widths."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (24, 48, 96, 192),
                 repeats: tuple[int, ...] = (4, 8, 4)) -> None:
        super().__init__()
        self.stem = _cbr(1, widths[0], 3, 2)
        layers: list[nn.Module] = []
        cin = widths[0]
        for w, r in zip(widths[1:], repeats, strict=True):
            layers += [ShuffleV2Block(cin, w, 2)] + [ShuffleV2Block(w, w, 1) for _ in range(r - 1)]
            cin = w
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean([2, 3]))

"""A tiny pre-norm vision transformer for 32x32 inputs (4x4 patches, 64 tokens + a class token).

:class:`Attention` is written the way structured pruners expect (one ``qkv`` Linear, a ``proj``
Linear, and reshapes driven by ``self.num_heads`` / ``self.head_dim`` rather than by the input
width), so heads, head dimensions, MLP width and the embedding width can all be pruned. After
pruning heads, set ``attn.num_heads`` and ``attn.head_dim`` from the pruned ``qkv``.

Attention is computed explicitly (``softmax(q @ k^T * scale) @ v``) rather than with
``F.scaled_dot_product_attention`` so FLOP counters see the two matmuls.
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import register_model

__all__ = ["Attention", "Block", "Mlp", "VisionTransformer", "vit_tiny_32"]


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection.

    Args:
        dim: token width.
        num_heads: number of heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(
                f"`dim` must be divisible by `num_heads`, but got dim={dim}, num_heads={num_heads}."
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # Fixed at construction: the trained weights expect this temperature even if pruning
        # later shrinks head_dim.
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over an ``(N, tokens, dim)`` tensor."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        # -1, not the input width: after pruning, num_heads * head_dim may differ from it.
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj(out)


class Mlp(nn.Module):
    """Two Linear layers (``fc1``, ``fc2``) with a GELU between.

    Args:
        dim: input and output width.
        hidden_dim: width of the hidden layer.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP token-wise."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to an ``(N, tokens, dim)`` tensor."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a conv patch embedding, a class token and a learned position embedding.

    Module names: ``patch_embed``, ``blocks.{i}.attn.qkv|proj``, ``blocks.{i}.mlp.fc1|fc2``,
    ``norm``, ``head``; parameters ``cls_token`` and ``pos_embed``.

    Args:
        img_size: input height and width.
        patch_size: side of the square patches.
        dim: token width.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        num_classes: outputs of the ``head``.
        in_chans: input image channels.
    """

    classifier_name = "head"

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        num_classes: int = 10,
        in_chans: int = 1,
    ) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(
                f"`img_size` must be divisible by `patch_size`, but got img_size={img_size}, "
                f"patch_size={patch_size}."
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, in_chans, 32, 32)`` images to ``(N, num_classes)`` logits."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register_model
def vit_tiny_32(num_classes: int = 10, in_chans: int = 1) -> VisionTransformer:
    """Tiny ViT for 32x32 inputs: 4x4 patches, dim 128, depth 4, 4 heads, MLP ratio 2.

    Example:
        >>> vit_tiny_32()(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    return VisionTransformer(
        patch_size=4,
        dim=128,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        num_classes=num_classes,
        in_chans=in_chans,
    )

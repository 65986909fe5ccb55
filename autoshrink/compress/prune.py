"""Structured, dependency-aware pruning with torch-pruning.

Channels are removed for real: coupled layers (a residual add, a concat, a depthwise conv and the
layer before it, BatchNorm, attention heads) are pruned together as one dependency group, so the
result is a smaller dense model, not a masked one.

A layer's ratio is the fraction of its *output* channels removed. When layers are coupled (all
convolutions feeding one residual add, say) torch-pruning removes the same channels from all of
them, with the ratio of the group's first layer; :class:`PruneReport` says what really happened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from autoshrink.candidate import Candidate

__all__ = ["LayerChange", "PruneReport", "find_head", "prunable_layers", "prune_"]

_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class LayerChange:
    """Output channels of one layer before and after pruning."""

    layer: str
    requested: float
    before: int
    after: int

    @property
    def achieved(self) -> float:
        return 1.0 - self.after / self.before if self.before else 0.0


@dataclass
class PruneReport:
    """What pruning did: per-layer channel counts, parameters, and layers left as they were."""

    layers: list[LayerChange] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it was not pruned

    def as_dict(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layers": [
                {
                    "layer": c.layer,
                    "requested": c.requested,
                    "channels_before": c.before,
                    "channels_after": c.after,
                }
                for c in self.layers
            ],
            "skipped": dict(self.skipped),
        }


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def find_head(model: nn.Module, example_input: torch.Tensor) -> str | None:
    """Name of the last Conv/Linear run in a forward pass: the classifier, whose outputs are the
    task's classes and so must never be pruned."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(names[mod]))
        for m in model.modules()
        if isinstance(m, _PRUNABLE)
    ]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else None


def prunable_layers(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the layers a candidate can prune or quantize (Conv/Linear, the head excluded
    from pruning but not from quantization: see :func:`quantizable_layers`)."""
    head = find_head(model, example_input)
    return [n for n, m in model.named_modules() if isinstance(m, _PRUNABLE) and n != head]


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """qkv projections of attention blocks with a ``num_heads`` attribute, for head pruning."""
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            continue  # torch-pruning handles nn.MultiheadAttention itself
        qkv = getattr(m, "qkv", None)
        if isinstance(qkv, nn.Linear) and isinstance(getattr(m, "num_heads", None), int):
            heads[qkv] = m.num_heads
    return heads


def _update_attention(model: nn.Module, heads: dict[nn.Module, int]) -> None:
    """After pruning head dimensions (the number of heads is kept), keep each attention block's
    ``head_dim`` in step with its qkv projection."""
    for m in model.modules():
        qkv = getattr(m, "qkv", None)
        if qkv in heads and hasattr(m, "head_dim"):
            m.head_dim = qkv.out_features // 3 // m.num_heads


def prune_(
    model: nn.Module,
    candidate: Candidate,
    example_input: torch.Tensor,
    *,
    ignored: Sequence[str] = (),
) -> PruneReport:
    """Prune ``model`` in place following ``candidate``'s per-layer ratios.

    Args:
        model: the model to prune (a copy of the teacher); it is changed in place.
        candidate: gives each layer's ratio (:meth:`Candidate.prune_for`) and ``round_to``.
        example_input: a batch the model accepts, used to trace dependencies.
        ignored: extra layer names never to prune (the classifier head is always ignored).

    Returns:
        A :class:`PruneReport` with channel counts before/after for every prunable layer.

    Example:
        >>> import torch.nn as nn, torch
        >>> m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> _ = m(torch.randn(1, 1, 5, 5))
        >>> prune_(m, Candidate.uniform(prune=0.5), torch.randn(1, 1, 5, 5)).layers[0].after
        4
    """
    import torch_pruning as tp  # heavy; only needed here

    model.eval()
    head = find_head(model, example_input)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _PRUNABLE) and n != head}
    before = {n: _out_channels(m) for n, m in layers.items()}
    ignored_modules = [m for n, m in model.named_modules() if n == head or n in set(ignored)]
    params_before = sum(p.numel() for p in model.parameters())

    ratios = {m: candidate.prune_for(n) for n, m in layers.items()}
    report = PruneReport(params_before=params_before)
    if any(r > 0 for r in ratios.values()):
        heads = _attention_heads(model)
        kwargs = {}
        if heads:
            kwargs = {"num_heads": heads, "prune_num_heads": False, "prune_head_dims": True}
        pruner = tp.pruner.MetaPruner(
            model,
            example_input,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.0,
            pruning_ratio_dict={m: r for m, r in ratios.items() if r > 0},
            ignored_layers=ignored_modules,
            round_to=candidate.round_to,
            **kwargs,
        )
        pruner.step()
        if heads:
            _update_attention(model, heads)
    for name, m in layers.items():
        req = ratios[m]
        after = _out_channels(m)
        report.layers.append(LayerChange(name, req, before[name], after))
        if req > 0 and after == before[name]:
            report.skipped[name] = _why_not_pruned(before[name], req, candidate.round_to)
    report.params_after = sum(p.numel() for p in model.parameters())
    return report


def _why_not_pruned(channels: int, ratio: float, round_to: int | None) -> str:
    if math.floor(channels * ratio) == 0:
        return f"{ratio:.2f} of {channels} channels rounds to zero"
    if round_to and channels <= round_to:
        return f"only {channels} channels, round_to={round_to}"
    return "coupled to a layer that is kept whole (input, head, or an ignored layer)"

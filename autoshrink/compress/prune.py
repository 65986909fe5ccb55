"""Structured, dependency-aware pruning with torch-pruning.

Channels are removed for real: coupled layers (a residual add, a concat, a depthwise conv and the
layer before it, BatchNorm, attention heads) are pruned together as one dependency group, so the
result is a smaller dense model, not a masked one.

A layer's ratio is the fraction of its *output* channels removed. When layers are coupled (all
convolutions feeding one residual add, say) torch-pruning removes the same channels from all of
them, with the ratio of the group's first layer; :class:`PruneReport` says what really happened.

``round_to`` rounds the kept channels down to a multiple of it, and never to zero: a ratio that
would keep fewer than ``round_to`` channels keeps ``round_to``. Layers whose channels come in
groups are rounded per group: a grouped convolution per group, an attention ``qkv`` projection
per head dimension (its width is ``3 * num_heads * head_dim`` and only ``head_dim`` shrinks);
separate ``query``/``key``/``value`` projections (Hugging Face layout) likewise, with the
block's ``attention_head_size``/``all_head_size`` updated so that its forward still runs.

What torch-pruning cannot handle degrades per dependency group, never to a raw traceback: a
group it cannot analyse or prune, one whose pruning breaks the forward pass (a width fixed in
``forward``: MobileViT's patch unfold, Swin's patch merging), one through a view it does not
follow (a window partition), one that would cut a grouped conv or a channel shuffle unevenly
across its groups, is left whole and listed in :attr:`PruneReport.unpruned_groups` with its
layers and the reason; the other groups are pruned. A group through a channel shuffle is pruned
with the shuffle's permutation, the same positions from every shuffle group. Graph construction
runs under a time and memory guard. The group-by-group machinery is in ``_groups`` (and
``_shuffle``); this module is the driver (ratios, rounding, the report).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from autoshrink import _batches
from autoshrink._forward import run_with_hooks
from autoshrink.candidate import Candidate
from autoshrink.compress._groups import (
    GraphGuardExceeded,
    Guard,
    attention_heads,
    out_channels,
    prune_groups,
)
from autoshrink.record import TrialAttr

__all__ = [
    "GRAPH_TIMEOUT_VAR",
    "GraphGuardExceeded",
    "LayerChange",
    "PruneReport",
    "default_graph_timeout_s",
    "find_head",
    "graph_groups",
    "prunable_layers",
    "prune_",
]

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class LayerChange:
    """Output channels of one layer before and after pruning.

    ``coupled`` names the other layers whose output channels are pruned together with this
    one (one dependency group: one ratio, the same channels removed); ``channel_groups`` is
    how many equal groups its channels form (heads x q/k/v for attention, ``groups`` for a
    grouped conv), so its channel count changes in steps of ``channel_groups * round_to``.
    """

    layer: str
    requested: float
    before: int
    after: int
    coupled: tuple[str, ...] = ()
    channel_groups: int = 1

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
    # dependency groups left whole although the candidate asked to prune them: (layers, why)
    unpruned_groups: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the pruning had to proceed (fallbacks)

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
                    "coupled": list(c.coupled),
                }
                for c in self.layers
            ],
            "skipped": dict(self.skipped),
            TrialAttr.UNPRUNED_GROUPS: [{"layers": list(g), "reason": why} for g, why in self.unpruned_groups],
            "notes": list(self.notes),
        }


def find_head(model: nn.Module, example_input: torch.Tensor) -> str | None:
    """Name of the last Conv/Linear run in a forward pass: the classifier, whose outputs are the
    task's classes and so must never be pruned."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    hooks = {m: lambda mod, _i, _o: order.append(names[mod]) for m in model.modules() if isinstance(m, PRUNABLE)}
    run_with_hooks(model, example_input, forward=hooks)
    return order[-1] if order else None


def prunable_layers(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the layers a candidate can prune or quantize (Conv/Linear, the head excluded
    from pruning but not from quantization: see :func:`quantizable_layers`)."""
    head = find_head(model, example_input)
    return [n for n, m in model.named_modules() if isinstance(m, PRUNABLE) and n != head]


DEFAULT_GRAPH_TIMEOUT_S = 60.0
DEFAULT_GRAPH_MEMORY_MB = 4096.0
GRAPH_TIMEOUT_VAR = "AUTOSHRINK_GRAPH_TIMEOUT_S"  # overrides the default limit, e.g. for a CLI run


def default_graph_timeout_s() -> float:
    """The graph-construction time limit: ``$AUTOSHRINK_GRAPH_TIMEOUT_S`` or 60 s."""
    raw = os.environ.get(GRAPH_TIMEOUT_VAR)
    if raw is None:
        return DEFAULT_GRAPH_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{GRAPH_TIMEOUT_VAR}={raw!r}: must be a number of seconds > 0 (unset it for the "
                         f"default {DEFAULT_GRAPH_TIMEOUT_S:g} s)")
    return value


_FROM_ENV = object()


def prune_(
    model: nn.Module,
    candidate: Candidate,
    example_input: torch.Tensor,
    *,
    ignored: Sequence[str] = (),
    graph_timeout_s: float | None = _FROM_ENV,  # type: ignore[assignment]
    graph_memory_mb: float | None = DEFAULT_GRAPH_MEMORY_MB,
) -> PruneReport:
    """Prune ``model`` in place following ``candidate``'s per-layer ratios.

    What torch-pruning cannot handle is left unpruned and reported, never raised: a dependency
    group whose channels it cannot map or prune, a group whose pruning breaks the forward pass
    (a width fixed in ``forward``), a group through a channel shuffle, attention whose q/k/v
    would lose equal, head-divisible widths. Dependency-graph construction runs under a time
    and memory limit; past it (or when construction fails) it is retried once without
    torch-pruning's reshape index mapping, keeping only the groups that cross no reshape.

    Args:
        model: the model to prune (a copy of the teacher); it is changed in place.
        candidate: gives each layer's ratio (:meth:`Candidate.prune_for`) and ``round_to``.
        example_input: a batch the model accepts, used to trace dependencies.
        ignored: extra layer names never to prune (the classifier head is always ignored).
        graph_timeout_s: limit on torch-pruning's graph construction and group analysis
            (seconds, cumulative; default :func:`default_graph_timeout_s`; None: no limit).
        graph_memory_mb: limit on the memory that work may add (MB; None: no limit).

    Returns:
        A :class:`PruneReport` with channel counts before/after for every prunable layer, and
        the groups left unpruned with the reason.

    Raises:
        RuntimeError: only if the pruned model no longer runs although every group ran alone.

    Example:
        >>> import torch.nn as nn, torch
        >>> m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> _ = m(torch.randn(1, 1, 5, 5))
        >>> prune_(m, Candidate.uniform(prune=0.5), torch.randn(1, 1, 5, 5)).layers[0].after
        4
    """
    model.eval()
    head = find_head(model, example_input)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE) and n != head}
    names = {m: n for n, m in layers.items()}
    before = {n: out_channels(m) for n, m in layers.items()}
    ignored_modules = [m for n, m in model.named_modules() if n == head or n in set(ignored)]
    params_before = sum(p.numel() for p in model.parameters())

    ratios = {m: candidate.prune_for(n) for n, m in layers.items()}
    report = PruneReport(params_before=params_before)
    heads = attention_heads(model)
    groups = {m: _channel_groups(m, heads) for m in layers.values()}
    coupled: dict[str, tuple[str, ...]] = {}
    if any(r > 0 for r in ratios.values()):
        asked = {
            m: _keep_at_least_one_step(out_channels(m), groups[m], r, candidate.round_to)
            for m, r in ratios.items()
            if r > 0
        }
        timeout_s = default_graph_timeout_s() if graph_timeout_s is _FROM_ENV else graph_timeout_s
        guard = Guard(timeout_s, graph_memory_mb)
        coupled = prune_groups(model, example_input, asked, ignored_modules, candidate.round_to, heads,
                                names, guard, report)
    for name, m in layers.items():
        req = ratios[m]
        after = out_channels(m)
        others = tuple(n for n in coupled.get(name, (name,)) if n != name)
        report.layers.append(LayerChange(name, req, before[name], after, others, groups[m]))
        if req > 0 and after == before[name] and name not in report.skipped:
            report.skipped[name] = _why_not_pruned(
                before[name], req, candidate.round_to, groups[m],
                None if name not in coupled else {n: candidate.prune_for(n) for n in others},
            )
    report.params_after = sum(p.numel() for p in model.parameters())
    _check_forward(model, example_input, report)
    return report


def graph_groups(
    model: nn.Module,
    example_input: Any,
    *,
    ignored: Sequence[str] = (),
    graph_timeout_s: float | None = _FROM_ENV,  # type: ignore[assignment]
    graph_memory_mb: float | None = DEFAULT_GRAPH_MEMORY_MB,
) -> tuple[list[tuple[str, ...]], PruneReport]:
    """The dependency groups :func:`prune_` would prune, found exactly as it finds them (the same
    guarded graph construction, retry without reshape mapping and vetoes), with nothing pruned.

    Args:
        model: the model (its weights are not changed).
        example_input: a batch it accepts.
        ignored: layer names kept whole (e.g. the classifier head): groups coupled to them are left out.
        graph_timeout_s, graph_memory_mb: the guard, as in :func:`prune_`.

    Returns:
        The prunable groups (member layer names, in graph order), and a :class:`PruneReport`
        whose ``unpruned_groups``/``skipped`` name the groups that would be left unpruned and why
        (``notes``: a rebuild without reshape mapping).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 9, 2))
        >>> graph_groups(m, torch.randn(1, 1, 5, 5), ignored=["3"])[0]
        [('0',)]
    """
    was_training = model.training
    model.eval()
    skip = set(ignored)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE) and n not in skip}
    names = {m: n for n, m in layers.items()}
    ignored_modules = [m for n, m in model.named_modules() if n in skip]
    report = PruneReport(params_before=sum(p.numel() for p in model.parameters()))
    timeout_s = default_graph_timeout_s() if graph_timeout_s is _FROM_ENV else graph_timeout_s
    found: list[tuple[str, ...]] = []
    try:
        prune_groups(model, example_input, {}, ignored_modules, None, attention_heads(model), names,
                      Guard(timeout_s, graph_memory_mb), report, found=found)
    finally:
        model.train(was_training)
    report.params_after = report.params_before
    return found, report


def _channel_groups(m: nn.Module, heads: dict[nn.Module, int]) -> int:
    """Equal groups a layer's output channels form; pruning removes the same channels in each."""
    if m in heads:
        return 3 * heads[m]  # q, k and v of every head
    groups = getattr(m, "groups", 1)
    if isinstance(m, nn.Conv2d | nn.Conv1d | nn.Conv3d) and 1 < groups < m.out_channels:
        return groups
    return 1  # a depthwise conv follows its input's channels one to one


def _keep_at_least_one_step(channels: int, groups: int, ratio: float, round_to: int | None) -> float:
    """The ratio to hand torch-pruning so that ``ratio`` never removes a whole layer.

    torch-pruning keeps ``int(per_group * (1 - ratio))`` channels per group, rounded down to a
    multiple of ``round_to``; when that is zero it prunes nothing at all. Asking instead for the
    smallest non-empty width (``round_to`` channels per group, or one) is closer to the request.
    """
    per_group = channels // max(groups, 1)
    step = round_to or 1
    if per_group <= step or (groups > 1 and per_group % step):
        # too few channels to shrink by a step, or groups torch-pruning cannot round evenly:
        # its own decision stands (and is reported if the layer stays whole)
        return ratio
    keep = int(per_group * (1.0 - ratio))
    if keep - keep % step > 0:
        return ratio
    return 1.0 - (step + 0.5) / per_group  # keeps exactly `step` per group


def _coupled_layers(pruner, layers: dict[str, nn.Module]) -> dict[str, tuple[str, ...]]:
    """For each prunable layer, the prunable layers whose output channels share its group
    (itself included). Layers in no group are coupled to something kept whole."""
    names = {m: n for n, m in layers.items()}
    out: dict[str, tuple[str, ...]] = {}
    for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        members = tuple(dict.fromkeys(
            names[dep.target.module]
            for dep, _ in group
            if dep.target.module in names and pruner.DG.is_out_channel_pruning_fn(dep.handler)
        ))
        for n in members:
            out.setdefault(n, members)
    return out


def _why_not_pruned(
    channels: int,
    ratio: float,
    round_to: int | None,
    groups: int = 1,
    others: dict[str, float] | None = None,
) -> str:
    per_group = channels // max(groups, 1)
    where = f" per group of {groups}" if groups > 1 else ""
    if others is None:
        return "coupled to a layer that is kept whole (the input, the head, or an ignored layer)"
    if math.floor(per_group * ratio) == 0:
        return f"{ratio:.2f} of {per_group} channels{where} rounds to zero"
    if round_to and per_group <= round_to:
        return f"only {per_group} channels{where}, round_to={round_to}"
    if round_to and groups > 1 and per_group % round_to:
        return f"{per_group} channels{where} is not a multiple of round_to={round_to}"
    if others:
        shown = ", ".join(f"{n}: {r:.2f}" for n, r in list(others.items())[:3])
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        return (f"pruned together with {len(others)} coupled layer(s) ({shown}{more}); "
                "one of their ratios applies to the whole group")
    return "torch-pruning left the layer's group whole"


def _check_forward(model: nn.Module, example_input: torch.Tensor, report: PruneReport) -> None:
    """A pruned model must still run: shapes hard-coded in ``forward`` (a reshape to a fixed
    width, say) break when channels go, and the error should say which layers changed."""
    try:
        with torch.no_grad():
            _batches.call(model, example_input)
    except Exception as exc:  # the user's forward: any error means pruning broke it
        changed = [c.layer for c in report.layers if c.after != c.before][:5]
        raise RuntimeError(
            f"the pruned model no longer runs ({type(exc).__name__}: {exc}); pruned layers "
            f"include {changed}. Give those layers prune 0 in the candidate, or compute shapes "
            "in forward() from the tensors (or, for attention, from num_heads/head_dim)"
        ) from exc

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
``forward``: MobileViT's patch unfold, Swin's patch merging), one through a channel shuffle, is
left whole and listed in :attr:`PruneReport.unpruned_groups` with its layers and the reason;
the other groups are pruned. Graph construction runs under a time and memory guard.

Long module (~650 lines): torch-pruning is wrapped here group by group (checks before a group is
pruned, the undo when it breaks the forward, the graph-construction guard, head-aware attention);
the pieces share one pruner and one report, and read best together.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from autoshrink import _batches
from autoshrink._forward import run_with_hooks
from autoshrink.candidate import Candidate
from autoshrink.compress._shuffle import (
    map_shuffles,
    probe_uneven_cut,
    shuffle_aware_graph,
    shuffle_channel_groups,
    uneven_cut,
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


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


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


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Attention projections and their head counts, for head-aware pruning.

    Two layouts: a fused ``qkv`` Linear next to an int ``num_heads`` (timm), and separate
    ``query``/``key``/``value`` Linears next to an int ``num_attention_heads`` (Hugging Face
    BERT/ViT/DeiT). ``nn.MultiheadAttention`` is handled by torch-pruning itself.
    """
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            continue
        qkv = getattr(m, "qkv", None)
        if isinstance(qkv, nn.Linear) and isinstance(getattr(m, "num_heads", None), int):
            heads[qkv] = m.num_heads
        n = getattr(m, "num_attention_heads", None)
        proj = [getattr(m, a, None) for a in _QKV]
        if isinstance(n, int) and all(isinstance(p, nn.Linear) for p in proj):
            heads.update({p: n for p in proj})
    return heads


_QKV = ("query", "key", "value")


def _update_attention(model: nn.Module, heads: dict[nn.Module, int]) -> None:
    """After pruning head dimensions (the number of heads is kept), keep each attention block's
    head attributes in step with its projections (``head_dim`` for timm, ``attention_head_size``
    and ``all_head_size`` for Hugging Face), so that ``forward`` reshapes to the new widths."""
    for m in model.modules():
        qkv = getattr(m, "qkv", None)
        if qkv in heads and hasattr(m, "head_dim"):
            m.head_dim = qkv.out_features // 3 // m.num_heads
        q = getattr(m, "query", None)
        if q in heads and isinstance(getattr(m, "num_attention_heads", None), int):
            if hasattr(m, "attention_head_size"):
                m.attention_head_size = q.out_features // m.num_attention_heads
            if hasattr(m, "all_head_size"):
                m.all_head_size = q.out_features


def _check_heads(model: nn.Module, heads: dict[nn.Module, int]) -> None:
    """q, k and v of each attention block must keep equal widths divisible by the head count."""
    for name, m in model.named_modules():
        proj = [getattr(m, a, None) for a in _QKV]
        if proj[0] in heads:
            widths = [p.out_features for p in proj]
            if len(set(widths)) != 1 or widths[0] % m.num_attention_heads:
                raise RuntimeError(f"{name}: query/key/value widths {widths} are not equal multiples of "
                                   f"num_attention_heads={m.num_attention_heads}")


class GraphGuardExceeded(BaseException):
    """Raised inside torch-pruning's work when it runs past its time or memory limit.

    A ``BaseException`` so that no ``except Exception`` inside the library swallows it.
    """


class _Guard:
    """A time and memory limit on pure-Python library work in this thread.

    A thread cannot be killed, and an alarm signal only reaches the main thread; a trace
    function can stop any thread: it is called on every Python function call (torch-pruning's
    graph construction and index mapping are Python all the way down) and raises
    :class:`GraphGuardExceeded` once the time spent under the guard (cumulative over ``with``
    blocks) passes ``timeout_s`` or the resident memory grows by more than ``memory_mb``.
    """

    def __init__(self, timeout_s: float | None, memory_mb: float | None) -> None:
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.spent_s = 0.0
        self._rss0 = _rss_mb()

    def capped(self, seconds: float | None) -> _Guard:
        """The next ``with`` block may spend at most ``seconds`` (within the overall limit)."""
        self._cap = seconds
        return self

    def __enter__(self) -> _Guard:
        cap, self._cap = getattr(self, "_cap", None), None
        if self.timeout_s is None and self.memory_mb is None:
            return self
        start = time.monotonic()
        self._start = start
        left = self.timeout_s - self.spent_s if self.timeout_s is not None else math.inf
        allowed = min(left, cap) if cap is not None else left
        deadline = start + allowed
        what = (f"exceeded graph_timeout_s={self.timeout_s:g} s" if allowed == left
                else f"exceeded {allowed:g} s, its share of graph_timeout_s={self.timeout_s:g} s")
        calls = 0

        def tracer(_frame, event, _arg):
            nonlocal calls
            if event == "call":
                calls += 1
                if time.monotonic() > deadline:
                    raise GraphGuardExceeded(what)
                if self.memory_mb is not None and calls % 2048 == 0 and _rss_mb() - self._rss0 > self.memory_mb:
                    raise GraphGuardExceeded(f"grew memory by more than graph_memory_mb={self.memory_mb:g} MB")
            return None  # no per-line tracing: only calls are checked

        self._previous = sys.gettrace()
        sys.settrace(tracer)
        return self

    def __exit__(self, *exc) -> None:
        if self.timeout_s is None and self.memory_mb is None:
            return
        sys.settrace(self._previous)
        self.spent_s += time.monotonic() - self._start


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux: the time limit still holds
        return 0.0


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
    before = {n: _out_channels(m) for n, m in layers.items()}
    ignored_modules = [m for n, m in model.named_modules() if n == head or n in set(ignored)]
    params_before = sum(p.numel() for p in model.parameters())

    ratios = {m: candidate.prune_for(n) for n, m in layers.items()}
    report = PruneReport(params_before=params_before)
    heads = _attention_heads(model)
    groups = {m: _channel_groups(m, heads) for m in layers.values()}
    coupled: dict[str, tuple[str, ...]] = {}
    if any(r > 0 for r in ratios.values()):
        asked = {
            m: _keep_at_least_one_step(_out_channels(m), groups[m], r, candidate.round_to)
            for m, r in ratios.items()
            if r > 0
        }
        timeout_s = default_graph_timeout_s() if graph_timeout_s is _FROM_ENV else graph_timeout_s
        guard = _Guard(timeout_s, graph_memory_mb)
        coupled = _prune_groups(model, example_input, asked, ignored_modules, candidate.round_to, heads,
                                names, guard, report)
    for name, m in layers.items():
        req = ratios[m]
        after = _out_channels(m)
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
        _prune_groups(model, example_input, {}, ignored_modules, None, _attention_heads(model), names,
                      _Guard(timeout_s, graph_memory_mb), report, found=found)
    finally:
        model.train(was_training)
    report.params_after = report.params_before
    return found, report


def _prune_groups(model, example_input, asked, ignored_modules, round_to, heads, names, guard, report, found=None):
    """Build torch-pruning's graph (guarded), set aside the groups it cannot handle, and prune
    the others one at a time, each undone if it fails or breaks the forward pass (with ``found``
    a list: only append each prunable group's members to it, prune nothing)."""
    with shuffle_aware_graph():
        return _build_and_prune(model, example_input, asked, ignored_modules, round_to, heads, names, guard,
                                report, found)


def _build_and_prune(model, example_input, asked, ignored_modules, round_to, heads, names, guard, report, found):
    import torch_pruning as tp  # heavy; only needed here

    def build(ignore, share=None):
        kwargs = {}
        if heads:
            kwargs = {"num_heads": heads, "prune_num_heads": False, "prune_head_dims": True}
        with guard.capped(share):
            return tp.pruner.MetaPruner(
                model, example_input,
                importance=tp.importance.GroupMagnitudeImportance(p=2),
                pruning_ratio=0.0, pruning_ratio_dict=asked, ignored_layers=list(ignore),
                round_to=round_to, **kwargs,
            )

    reshape_safe = False
    try:
        # half the time at most: a hang must leave time for the retry without reshape mapping
        pruner = build(ignored_modules, guard.timeout_s / 2 if guard.timeout_s is not None else None)
    except (Exception, GraphGuardExceeded) as exc:  # the library's failure, translated below
        first = _reason(exc)
        try:
            with _without_reshape_mapping():
                pruner = build(ignored_modules)
            reshape_safe = True
        except (Exception, GraphGuardExceeded) as exc2:
            why = (f"left unpruned: torch-pruning's dependency graph construction {first}, and again "
                   f"without reshape mapping ({_reason(exc2)})")
            report.unpruned_groups.append((tuple(names.values()), why))
            for n in names.values():
                report.skipped[n] = why
            return {}
        report.notes.append(f"dependency graph construction {first}; rebuilt without torch-pruning's "
                            "reshape index mapping, so only groups that cross no reshape are pruned")

    # torch-pruning redoes its index mapping for every group it builds: keep it off throughout
    with _without_reshape_mapping() if reshape_safe else contextlib.nullcontext():
        # channels mapped through each channel shuffle's permutation (not with reshape mapping off:
        # every group through a reshape is vetoed then)
        shuffles = {} if reshape_safe else map_shuffles(pruner.DG)
        return _analyse_and_prune(pruner, model, example_input, heads, names, guard, report, reshape_safe,
                                  shuffles, found)


def _analyse_and_prune(pruner, model, example_input, heads, names, guard, report, reshape_safe, shuffles,
                       found=None):
    def members(group) -> tuple[str, ...]:
        return tuple(dict.fromkeys(
            names[dep.target.module] for dep, _ in group
            if dep.target.module in names and pruner.DG.is_out_channel_pruning_fn(dep.handler)))

    def set_aside(group_members, why):
        if group_members:
            report.unpruned_groups.append((group_members, why))
        for n in group_members:
            report.skipped.setdefault(n, why)

    # 1. groups torch-pruning cannot analyse, or that must not be pruned, are ignored up front
    coupled: dict[str, tuple[str, ...]] = {}
    before = {n: _out_channels(m) for m, n in names.items()}
    try:
        with guard:
            for root, group in _all_groups(pruner, names):
                g_members = members(group) if not isinstance(group, BaseException) else (names[root],)
                for n in g_members:
                    coupled.setdefault(n, g_members)
                why = _veto(group, reshape_safe, shuffles) if not isinstance(group, BaseException) else (
                    f"left unpruned: torch-pruning cannot trace this group ({_reason(group)})")
                if why is None:
                    why = _in_shuffle_groups(pruner, group, shuffles, root)
                if why is None:
                    uneven = probe_uneven_cut(pruner, root, group, shuffles, names)
                    why = f"left unpruned: {uneven}" if uneven else None
                if why is None:
                    try:
                        pruner.estimate_importance(group)
                    except Exception as exc:  # noqa: BLE001 - an index torch-pruning mapped wrongly
                        why = f"left unpruned: torch-pruning cannot map this group's channels ({_reason(exc)})"
                if why is not None:
                    set_aside(g_members, why)
                    pruner.ignored_layers.extend(model.get_submodule(n) for n in g_members)
                elif found is not None and g_members:
                    found.append(g_members)
    except GraphGuardExceeded as exc:
        set_aside(tuple(names.values()), f"left unpruned: torch-pruning's group analysis {_reason(exc)}")
        if found is not None:
            found.clear()
        return coupled
    if found is not None:
        return coupled

    # 2. prune group by group; undo a group that fails or breaks the forward pass
    steps = pruner.step(interactive=True)
    while True:
        try:
            with guard:
                group = next(steps)
        except StopIteration:
            break
        except (Exception, GraphGuardExceeded) as exc:
            why = f"left unpruned: torch-pruning failed while ranking the remaining groups ({_reason(exc)})"
            set_aside(tuple(n for m, n in names.items() if n not in report.skipped
                            and _out_channels(m) == before[n]), why)
            break
        g_members = members(group)
        uneven = uneven_cut(group, shuffles, names, pruner.DG)
        if uneven is not None:  # torch-pruning would prune it, but into a different computation
            set_aside(g_members, f"left unpruned: {uneven}")
            continue
        saved = _snapshot(group)
        try:
            group.prune()
        except Exception as exc:  # noqa: BLE001
            _restore(saved)
            set_aside(g_members, f"left unpruned: torch-pruning failed to prune this group ({_reason(exc)})")
            continue
        _update_attention(model, heads)
        try:
            _check_heads(model, heads)
            with torch.no_grad():
                _batches.call(model, example_input)
        except Exception as exc:  # noqa: BLE001 - the user's forward: a width fixed in it
            _restore(saved)
            _update_attention(model, heads)
            set_aside(g_members, "left unpruned: the model no longer runs with this group pruned "
                      f"({_reason(exc)}; a width fixed in forward())")
    return coupled


def _reason(exc: BaseException) -> str:
    if isinstance(exc, GraphGuardExceeded):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _all_groups(pruner, names: dict[nn.Module, str]):
    """Each group torch-pruning would rank, once, as ``(root, group)``: the groups of
    ``DependencyGraph.get_all_groups``, but one root's failure to trace is yielded as
    ``(root, exception)`` instead of ending the walk."""
    dg = pruner.DG
    ignored = list(pruner.ignored_layers) + list(dg.IGNORED_LAYERS_IN_TRACING)
    visited: set[int] = set()
    for m in list(dg.module2node):
        if m not in names or any(m is i for i in ignored) or id(m) in visited:
            continue
        handler = dg.get_pruner_of_module(m)
        if handler is None or handler.get_out_channels(m) is None:
            continue
        try:
            group = dg.get_pruning_group(m, handler.prune_out_channels, list(range(handler.get_out_channels(m))))
        except Exception as exc:  # noqa: BLE001
            visited.add(id(m))
            yield m, exc
            continue
        outs = [dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)]
        visited.update(id(o) for o in outs)
        if any(o is i for o in outs for i in ignored):
            continue  # coupled to something kept whole; reported by _why_not_pruned
        yield m, group


def _in_shuffle_groups(pruner, group, shuffles, root) -> str | None:
    """A group crossing a channel shuffle is pruned in channel groups that keep the shuffle (and
    the grouped convs around it) the same computation on fewer channels; None when it can be."""
    need = shuffle_channel_groups(group, shuffles)
    if need is None:
        return None
    channels = pruner.DG.get_out_channels(root)
    if not channels or channels % need:
        return (f"left unpruned: the group crosses a channel shuffle and its {channels} channels do not form "
                f"{need} equal groups (the same channels must go from each shuffle and conv group)")
    for dep, _ in group:
        if pruner.DG.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, nn.Module):
            pruner.out_channel_groups[dep.target.module] = need
    return None


def _veto(group, reshape_safe: bool, shuffles=None) -> str | None:
    """Why a group must not be pruned even if torch-pruning would: it crosses a view through more
    than four dimensions that is not a recognised channel shuffle (a window/patch partition: its
    channel order torch-pruning does not follow; a recognised shuffle's permutation is on the
    graph, :func:`map_shuffles`), or any reshape when the reshape mapping had to be switched off."""
    from torch_pruning import ops

    for dep, _ in group:
        node = dep.target
        if node.type != ops.OPTYPE.RESHAPE or (shuffles and node in shuffles):
            continue
        sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", getattr(node.grad_fn, "_saved_self_sizes", None))
        if sizes is not None and len(sizes) > 4:
            return ("left unpruned: the group crosses a view to more than four dimensions (a channel shuffle "
                    "through a groups axis, or a window/patch partition), whose channel order torch-pruning "
                    "does not follow")
        if reshape_safe:
            return ("left unpruned: the group crosses a reshape, and torch-pruning's reshape mapping was "
                    "switched off (graph construction failed with it)")
    return None


@contextlib.contextmanager
def _without_reshape_mapping():
    """torch-pruning's index mapping through reshapes recurses through every concat and split
    it meets (exponential on ShuffleNetV2's split/concat/shuffle chain) and can divide by zero
    on a shuffle's view; switched off for one graph construction, groups through a reshape are
    then vetoed (:func:`_veto`)."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping
    index_mapping.update_reshape_index_mapping = lambda graph, node: None
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original


def _snapshot(group) -> list[tuple[object, dict]]:
    """Enough of every module (and bare parameter) a group touches to undo its pruning: the
    library replaces parameters and size attributes rather than editing them in place."""
    saved, seen = [], set()
    for dep, _ in group:
        for node in (dep.source, dep.target):
            obj = node.module
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, torch.Tensor):
                saved.append((obj, {"data": obj.data}))
            elif isinstance(obj, nn.Module):
                state = {k: (copy.copy(v) if isinstance(v, dict | list | set) else v)
                         for k, v in vars(obj).items() if k != "_modules"}
                saved.append((obj, state))
    return saved


def _restore(saved: list[tuple[object, dict]]) -> None:
    for obj, state in saved:
        if isinstance(obj, torch.Tensor):
            obj.data = state["data"]
        else:
            vars(obj).update(state)


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

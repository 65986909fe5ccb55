"""torch-pruning, dependency group by dependency group, degrading instead of failing.

The machinery under :func:`autoshrink.compress.prune.prune_` and ``graph_groups``: torch-pruning's
dependency graph built under a time and memory guard (:class:`Guard`, retried once without its
reshape index mapping), each group it finds checked before it is pruned (one it cannot trace or
map, one through a view it does not follow, one that would cut a channel shuffle or a grouped
conv unevenly: left whole with the reason), then pruned one at a time and undone when the pruning
fails or breaks the forward pass; head-aware attention (the head attributes of each attention
block kept in step with its q/k/v widths). Channel shuffles and grouped convs: ``_shuffle``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time

import torch
import torch.nn as nn

from autoshrink import _batches
from autoshrink.compress._shuffle import (
    map_shuffles,
    probe_uneven_cut,
    shuffle_aware_graph,
    shuffle_channel_groups,
    uneven_cut,
)

__all__ = [
    "Guard",
    "GraphGuardExceeded",
    "attention_heads",
    "check_heads",
    "out_channels",
    "prune_groups",
    "rss_mb",
    "update_attention",
]


def out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
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


def update_attention(model: nn.Module, heads: dict[nn.Module, int]) -> None:
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


def check_heads(model: nn.Module, heads: dict[nn.Module, int]) -> None:
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


class Guard:
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
        self._rss0 = rss_mb()

    def capped(self, seconds: float | None) -> Guard:
        """The next ``with`` block may spend at most ``seconds`` (within the overall limit)."""
        self._cap = seconds
        return self

    def __enter__(self) -> Guard:
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
                if self.memory_mb is not None and calls % 2048 == 0 and rss_mb() - self._rss0 > self.memory_mb:
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


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux: the time limit still holds
        return 0.0


def prune_groups(model, example_input, asked, ignored_modules, round_to, heads, names, guard, report, found=None):
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
    before = {n: out_channels(m) for m, n in names.items()}
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
                            and out_channels(m) == before[n]), why)
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
        update_attention(model, heads)
        try:
            check_heads(model, heads)
            with torch.no_grad():
                _batches.call(model, example_input)
        except Exception as exc:  # noqa: BLE001 - the user's forward: a width fixed in it
            _restore(saved)
            update_attention(model, heads)
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

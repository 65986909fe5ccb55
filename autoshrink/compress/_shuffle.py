"""Channel shuffles and grouped convolutions in torch-pruning's dependency graph.

A channel shuffle of ``g`` groups (``view(b, g, c // g, h, w)`` → ``transpose(1, 2)`` →
``view(b, c, h, w)``, as torchvision's ShuffleNet writes it, or with ``permute(0, 2, 1, 3, 4)``)
sends input channel ``i * (c // g) + j`` to output channel ``j * g + i``. torch-pruning maps
channels straight through it, so a group crossing one would remove the wrong channels after it.
:func:`map_shuffles` puts the real permutation on the graph's edges instead. The pruned model is
then the same shuffle of fewer channels only when every shuffle group loses the same positions
(the view needs ``c' = g * (c' // g)`` and the interleave needs equal groups): the pruner is asked
for channel groups that make it so (:func:`shuffle_channel_groups`) and :func:`uneven_cut`
checks each group before it is pruned, together with the other thing torch-pruning gets silently
wrong: a grouped convolution whose input (or output) channels would be cut unevenly across its
groups (its ``prune_in_channels`` then keeps the first kept positions and mixes groups up).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import torch.nn as nn

__all__ = ["map_shuffles", "probe_uneven_cut", "shuffle_aware_graph", "shuffle_channel_groups", "uneven_cut"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _ShuffleIndexMapping:
    """Channel indices through a shuffle of ``g`` groups of ``s`` channels (``reverse``: back)."""

    def __init__(self, g: int, s: int, reverse: bool) -> None:
        self.g, self.s, self.reverse = g, s, reverse

    def __call__(self, idxs):
        g, s = self.g, self.s
        if self.reverse:  # shuffled q = j * g + i  ->  unshuffled i * s + j
            return [type(i)(idx=(i.idx % g) * s + i.idx // g, root_idx=i.root_idx) for i in idxs]
        return [type(i)(idx=(i.idx % s) * g + i.idx // s, root_idx=i.root_idx) for i in idxs]


def _sizes(node) -> tuple[int, ...] | None:
    gf = node.grad_fn
    sizes = getattr(gf, "_saved_self_sym_sizes", getattr(gf, "_saved_self_sizes", None))
    return tuple(int(v) for v in sizes) if sizes is not None else None


def _shuffle_of(node) -> tuple[int, int, object] | None:
    """``(g, s, opening view)`` when ``node`` is the closing view of a channel shuffle, else None."""
    from torch_pruning import ops

    if node.type != ops.OPTYPE.RESHAPE:
        return None
    sizes = _sizes(node)
    if sizes is None or len(sizes) != 5 or len(node.inputs) != 1:
        return None
    _, s, g, _, _ = sizes  # the view's input: (b, c // g, g, h, w) after the transpose
    prev = node.inputs[0]
    for _ in range(3):  # through contiguous()/clone to the transpose
        name = prev.grad_fn.name() if prev.grad_fn is not None else ""
        if name.startswith("Clone") and len(prev.inputs) == 1:
            prev = prev.inputs[0]
            continue
        break
    gf = prev.grad_fn
    name = gf.name() if gf is not None else ""
    if name.startswith("TransposeBackward"):
        swapped = {int(gf._saved_dim0) % 5, int(gf._saved_dim1) % 5} == {1, 2}
    elif name.startswith("PermuteBackward"):
        swapped = tuple(int(d) % 5 for d in gf._saved_dims) == (0, 2, 1, 3, 4)
    else:
        return None
    if not swapped or len(prev.inputs) != 1:
        return None
    first = prev.inputs[0]
    first_sizes = _sizes(first) if first.type == ops.OPTYPE.RESHAPE else None
    if first_sizes is None or len(first_sizes) != 4 or first_sizes[1] != g * s:
        return None
    return g, s, first


def _opens_shuffle(node) -> bool:
    """Whether ``node`` is the opening view of a channel shuffle (``view(b, g, c // g, h, w)``)."""
    from torch_pruning import ops

    if node.type != ops.OPTYPE.RESHAPE:
        return False
    frontier = list(node.outputs)
    for _ in range(3):  # view -> transpose -> (clone) -> view
        nxt = []
        for o in frontier:
            found = _shuffle_of(o)
            if found is not None and found[2] is node:
                return True
            nxt.extend(o.outputs)
        frontier = nxt
    return False


@contextlib.contextmanager
def shuffle_aware_graph():
    """Two repairs to torch-pruning's graph construction, for the time of one pruning:

    - a channel shuffle's views are left out of its reshape index mapping, which reads them as
      a flatten and divides by a zero channel count, or, on ShuffleNetV2's chain of
      split/concat/shuffle, recurses through every concat and split it meets (a hang); the
      shuffle's own mapping is put on the graph afterwards (:func:`map_shuffles`);
    - a ``chunk``/``split`` gets its offsets from the sizes the autograd node saved: torch-pruning
      looks for ``_saved_self_sizes``, which this torch names ``_saved_self_sym_sizes``, and its
      fallback (channel inference) drops the outputs it cannot infer, leaving too few offsets.
    """
    from torch_pruning.dependency import index_mapping, shape_infer

    reshape, init_shapes = index_mapping.update_reshape_index_mapping, shape_infer.init_shape_information

    def update_reshape(graph, node):
        if _shuffle_of(node) is None and not _opens_shuffle(node):
            reshape(graph, node)

    def init_shape_information(graph):
        init_shapes(graph)
        _split_offsets(graph)

    index_mapping.update_reshape_index_mapping = update_reshape
    shape_infer.init_shape_information = init_shape_information
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = reshape
        shape_infer.init_shape_information = init_shapes


def _split_offsets(graph) -> None:
    from torch_pruning import ops

    for node in graph.module2node.values():
        gf = node.grad_fn
        if node.type != ops.OPTYPE.SPLIT or gf is None:
            continue
        sizes = getattr(gf, "_saved_self_sym_sizes", None)
        if sizes is None or len(sizes) < 2 or int(gf._saved_dim) % len(sizes) != 1:
            continue  # not a split along channels
        c = int(sizes[1])
        if hasattr(gf, "_saved_split_sizes"):
            chunks = [int(v) for v in gf._saved_split_sizes]
        elif hasattr(gf, "_saved_split_size"):
            step = int(gf._saved_split_size)
            chunks = [min(step, c - a) for a in range(0, c, step)]
        else:
            continue
        if sum(chunks) != c:
            continue
        offsets = [0]
        for ch in chunks:
            offsets.append(offsets[-1] + ch)
        node.module.split_sizes, node.module.offsets = chunks, offsets


def map_shuffles(dg) -> dict[object, int]:
    """Put each channel shuffle's permutation on the edges into its closing view.

    Under :func:`shuffle_aware_graph` torch-pruning's own index-mapping update leaves the
    shuffle's views alone, so the mapping stays for the graph's lifetime. Returns the
    closing-view nodes and their group counts.
    """
    shuffles: dict[object, int] = {}
    for node in list(dg.module2node.values()):
        found = _shuffle_of(node)
        if found is None:
            continue
        g, s, _ = found
        inp = node.inputs[0]
        for dep in inp.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = _ShuffleIndexMapping(g, s, reverse=False)
        for dep in node.dependencies:
            if dep.target is inp:
                dep.index_mapping[0] = _ShuffleIndexMapping(g, s, reverse=True)
        shuffles[node] = g
    if shuffles:
        _roots_before_shuffles(dg, shuffles)
    return shuffles


def _roots_before_shuffles(dg, shuffles: dict[object, int]) -> None:
    """Make the layers that produce a shuffle's input come first in the graph's module order,
    which is the order torch-pruning picks group roots in: rooted there, a group's channel groups
    are the shuffle's own (same positions from each), which pruning can keep equal; rooted after
    the shuffle they are interleaved, and torch-pruning cannot ask for that."""
    producers: list[object] = []
    for end in shuffles:
        stack, seen = list(end.inputs), set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node.module, _CONV + (nn.Linear,)):
                producers.append(node.module)
            else:
                stack.extend(node.inputs)
    order = dict.fromkeys(producers)
    rest = {m: n for m, n in dg.module2node.items() if m not in order}
    front = {m: dg.module2node[m] for m in order if m in dg.module2node}
    dg.module2node.clear()
    dg.module2node.update(front)
    dg.module2node.update(rest)


def _grouped(m) -> int:
    """A conv's groups when they are not depthwise (one channel each), else 1."""
    if isinstance(m, _CONV) and 1 < m.groups and not (m.groups == m.in_channels == m.out_channels):
        return m.groups
    return 1


def shuffle_channel_groups(group, shuffles: dict[object, int]) -> int | None:
    """The channel groups a group crossing shuffles must be pruned in (same positions removed
    from each): every crossed shuffle's ``g`` times the groups of the grouped convs beyond it,
    and every member's own groups. None when the group crosses no shuffle."""
    crossed = [shuffles[dep.target] for dep, _ in group if dep.target in shuffles]
    if not crossed:
        return None
    member_groups = [_grouped(dep.target.module) for dep, _ in group]
    inner = math.lcm(*member_groups)
    return math.lcm(inner, *(g * inner for g in crossed))


def uneven_cut(group, shuffles: dict[object, int], names: dict, dg) -> str | None:
    """Why pruning ``group`` as torch-pruning chose would compute something else: a shuffle or
    a grouped conv whose groups would not all lose the same positions. None when it is sound."""
    for dep, idxs in group:
        node = dep.target
        idxs = [int(i) for i in idxs]
        if node in shuffles:
            g = shuffles[node]
            if any(c != g for c in Counter(i // g for i in idxs).values()):
                return f"its channel shuffle of {g} groups would lose different channels in each group"
        m = node.module
        groups = _grouped(m)
        if groups == 1 or not idxs:
            continue
        out = dg.is_out_channel_pruning_fn(dep.handler)
        total = m.out_channels if out else m.in_channels
        size = total // groups
        per = [sorted(i % size for i in idxs if i // size == k) for k in range(groups)]
        if any(p != per[0] for p in per):
            side = "output" if out else "input"
            where = names.get(m, type(m).__name__)
            return (f"grouped conv {where} (groups={groups}) would lose different {side} channels in each of "
                    "its groups (a grouped conv can only lose the same positions in every group)")
    return None


def probe_uneven_cut(pruner, root, group, shuffles: dict[object, int], names: dict) -> str | None:
    """:func:`uneven_cut` before anything is chosen: torch-pruning removes the same positions
    from each of the group's channel groups (rooted at ``root``), so removing the first position
    of each shows whether the shuffles and grouped convs it reaches are cut evenly. None when the
    group reaches neither, or is cut evenly."""
    if not any(dep.target in shuffles or _grouped(dep.target.module) > 1 for dep, _ in group):
        return None
    dg = pruner.DG
    channels = dg.get_out_channels(root)
    blocks = pruner._get_channel_groups(group)  # what torch-pruning's step will use
    if not channels or channels % blocks:
        return None  # torch-pruning's own checks apply
    handler = dg.get_pruner_of_module(root)
    probe = dg.get_pruning_group(root, handler.prune_out_channels, [k * (channels // blocks) for k in range(blocks)])
    return uneven_cut(probe, shuffles, names, dg)

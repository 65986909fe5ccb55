"""Search spaces derived from a model's own graph, so that no YAML has to be written.

:func:`analyze` runs the model once on its example input and reads off what a search can act
on: the Conv/Linear layers in the order they run, the stem (the first layer, which sees the raw
input) and the classifier head (the last one), and torch-pruning's dependency groups (layers
whose output channels must be pruned together). :func:`auto_space` gathers the layers into a few
stages along the model's own blocks (its top-level children, descending into the container that
holds most of the layers: ``blocks.0``, ``encoder.layer.3``), gives each stage bits ``[4, 8, 32]``
and a pruning range that grows with depth, protects the stem and head (``[8, 32]``, no pruning
rule of their own: the head is never pruned, the stem only as part of a group a stage's layer
leads, such as a ViT's residual stream), and takes the KD and fine-tune knobs from the bundled
``default.yaml``. The result's patterns name only the model's real modules, so it binds to the
model it came from.

Example:
    >>> from autoshrink import models
    >>> m = models.create("resnet20").eval()
    >>> space = auto_space(m, torch.randn(1, 1, 32, 32))
    >>> [r.pattern for r in space.rules()]
    ['conv1', 'fc', 'layer1.*', 'layer2.*', 'layer3.*']
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import yaml

from autoshrink._forward import run_with_hooks
from autoshrink.compress.quantize import QUANTIZABLE
from autoshrink.space import SearchSpace

__all__ = ["ModelGraph", "PruneGroup", "analyze", "auto_space", "model_name", "space_to_yaml"]

_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
STAGE_BITS = [4, 8, 32]
PROTECTED_BITS = [8, 32]  # the stem sees raw inputs, the head makes the decision: 4 bits costs most there
PRUNE_STEP = 0.125
MAX_STAGES = 4


@dataclass(frozen=True)
class PruneGroup:
    """Layers whose output channels torch-pruning removes together (one ratio, the same channels).

    ``root`` is the layer the group's ratio is read from (its first layer); ``channels`` how many
    output channels each member has.
    """

    root: str
    layers: tuple[str, ...]
    channels: int


@dataclass(frozen=True)
class ModelGraph:
    """What a search can act on in one model (see :func:`analyze`).

    Attributes:
        order: Conv/Linear layers in the order the forward pass runs them.
        stem: the first layer when it reads the model's input directly (a conv on the pixels),
            else None (a text model's first Linear reads embeddings).
        head: the last layer run: the classifier, never pruned.
        quantizable: layers that take a per-layer bit-width (Conv2d and Linear).
        groups: torch-pruning's dependency groups of prunable layers.
        unprunable: prunable-type layers in no group, and why.
        params: weight+bias parameters of each layer in ``order``.
        graph_error: why the dependency graph could not be built ("" when it was).
        unpruned_groups: groups a trial's pruning would leave whole, as ``(layers, reason)``
            (the reasons ``PruneReport.unpruned_groups`` gives: "left unpruned: ...").
    """

    order: tuple[str, ...]
    stem: str | None
    head: str | None
    quantizable: tuple[str, ...]
    groups: tuple[PruneGroup, ...] = ()
    unprunable: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, int] = field(default_factory=dict)
    graph_error: str = ""
    unpruned_groups: tuple[tuple[tuple[str, ...], str], ...] = ()

    @property
    def prunable(self) -> tuple[str, ...]:
        """Layers in some dependency group, in forward order."""
        members = {n for g in self.groups for n in g.layers}
        return tuple(n for n in self.order if n in members)


def model_name(model: nn.Module) -> str:
    """A short name for a model: its zoo name, its Hugging Face ``model_type``, or its class."""
    cfg = getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        return str(cfg["architecture"])
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str) and model_type:
        return f"{model_type}:{type(model).__name__}"
    return type(model).__name__


def _inputs_of(example_input: Any) -> list[torch.Tensor]:
    if isinstance(example_input, Mapping):
        return [v for v in example_input.values() if isinstance(v, torch.Tensor)]
    return [example_input]


def _forward_order(model: nn.Module, example_input: Any) -> tuple[list[str], set[str]]:
    """Conv/Linear layers in the order they first run, and those that read the model input."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    raw: set[str] = set()
    given = {id(t) for t in _inputs_of(example_input)}

    def pre(mod, args):
        name = names[mod]
        if name not in order:
            order.append(name)
            if args and isinstance(args[0], torch.Tensor) and id(args[0]) in given:
                raw.add(name)

    run_with_hooks(model, example_input, pre={m: pre for m in model.modules() if isinstance(m, _PRUNABLE)})
    return order, raw


def _dependency_groups(
    model: nn.Module, example_input: Any, head: str | None
) -> tuple[list[PruneGroup], str, list[tuple[tuple[str, ...], str]]]:
    """The groups a trial's pruning would act on, found as it finds them (the guarded graph
    construction of :func:`autoshrink.compress.prune.graph_groups`), and those it would leave
    unpruned with the reason."""
    from autoshrink.compress.prune import graph_groups

    modules = dict(model.named_modules())
    with contextlib.redirect_stdout(None), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes on unwrapped parameters (a ViT's pos_embed)
        found, report = graph_groups(model, example_input, ignored=[head] if head is not None else [])
    groups = []
    for members in found:
        m = modules[members[0]]
        groups.append(PruneGroup(members[0], members, m.out_features if isinstance(m, nn.Linear) else m.out_channels))
    error = ""
    if not found and report.unpruned_groups:
        error = report.unpruned_groups[0][1]
    return groups, error, list(report.unpruned_groups)


def analyze(model: nn.Module, example_input: Any) -> ModelGraph:
    """Run ``model`` once on ``example_input`` and read off its layers, stem, head and groups.

    Args:
        model: the model (not modified).
        example_input: one batch it accepts: a tensor, or a dict of tensors (``model(**x)``).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 9, 2))
        >>> g = analyze(m, torch.randn(1, 1, 5, 5))
        >>> g.stem, g.head, [grp.layers for grp in g.groups]
        ('0', '3', [('0',)])
    """
    order, raw = _forward_order(model, example_input)
    head = order[-1] if order else None
    modules = dict(model.named_modules())
    first = order[0] if order else None
    stem = None
    if first is not None and first != head and (first in raw or isinstance(modules[first], nn.Conv2d)):
        stem = first
    groups, error, unpruned = _dependency_groups(model, example_input, head) if len(order) > 1 else ([], "", [])
    grouped = {n for g in groups for n in g.layers}
    unprunable: dict[str, str] = {}
    for members, why in unpruned:
        for n in members:
            unprunable.setdefault(n, why)
    for n in order:
        if n == head:
            unprunable[n] = "the classifier head: its outputs are the classes"
        elif n in unprunable:
            continue
        elif n not in grouped:
            unprunable[n] = error or ("coupled to a layer kept whole (the model's input or output, "
                                      "or the head) in torch-pruning's dependency graph")
    params = {n: sum(p.numel() for p in modules[n].parameters(recurse=False)) for n in order}
    return ModelGraph(
        order=tuple(order),
        stem=stem,
        head=head,
        quantizable=tuple(n for n in order if isinstance(modules[n], QUANTIZABLE)),
        groups=tuple(groups),
        unprunable=unprunable,
        params=params,
        graph_error=error,
        unpruned_groups=tuple(unpruned),
    )


# -- stages -----------------------------------------------------------------------------------------
@dataclass
class _Unit:
    prefix: str  # a module name; its pattern is "prefix.*" (or the name itself for a leaf layer)
    layers: list[str]
    leaf: bool

    @property
    def weight(self) -> int:
        return len(self.layers)


def _units(model: nn.Module, layers: list[str]) -> list[_Unit]:
    """The model's blocks that hold ``layers``, in forward order: its top-level children, with the
    child holding most layers replaced by its own children (recursively: ``blocks`` becomes
    ``blocks.0``, ``blocks.1``, ...; ``bert`` becomes ``bert.encoder.layer.0``, ...)."""
    modules = dict(model.named_modules())
    rank = {n: i for i, n in enumerate(layers)}

    def children(prefix: str) -> list[_Unit]:
        mod = modules[prefix] if prefix else model
        out = []
        for child, _ in mod.named_children():
            name = f"{prefix}.{child}" if prefix else child
            held = [n for n in layers if n == name or n.startswith(name + ".")]
            if held:
                out.append(_Unit(name, held, leaf=name in rank))
        return sorted(out, key=lambda u: rank[u.layers[0]])

    units = children("")
    total = len(layers)
    while True:
        big = max(units, key=lambda u: u.weight, default=None)
        if big is None or big.leaf or (big.weight <= total / 2 and len(units) > 1):
            return units
        kids = children(big.prefix)
        i = units.index(big)
        units[i:i + 1] = kids


def _index(unit: _Unit) -> tuple[str, str] | None:
    parent, _, last = unit.prefix.rpartition(".")
    return (parent, last) if last.isdigit() else None


def _pattern(units: list[_Unit]) -> str | None:
    """One fnmatch glob matching exactly the layers of ``units`` (None when there is none)."""
    if len(units) == 1:
        u = units[0]
        return u.prefix if u.leaf else f"{u.prefix}.*"
    keys = [_index(u) for u in units]
    if any(k is None for k in keys) or len({k[0] for k in keys}) != 1 or any(u.leaf for u in units):
        return None
    digits = [k[1] for k in keys]
    head = {d[:-1] for d in digits}
    if len(head) != 1 or len({len(d) for d in digits}) != 1:
        return None
    lasts = sorted(int(d[-1]) for d in digits)
    if lasts != list(range(lasts[0], lasts[-1] + 1)):
        return None
    return f"{keys[0][0]}.{head.pop()}[{lasts[0]}-{lasts[-1]}].*"


def _runs(units: list[_Unit]) -> list[list[_Unit]]:
    """Maximal stretches of sibling blocks numbered in sequence (``blocks.0``, ``blocks.1``)."""
    runs: list[list[_Unit]] = []
    for u in units:
        prev = runs[-1][-1] if runs else None
        a, b = (_index(prev) if prev else None), _index(u)
        if a and b and a[0] == b[0] and int(b[1]) == int(a[1]) + 1 and not (prev.leaf or u.leaf):
            runs[-1].append(u)
        else:
            runs.append([u])
    return runs


def _split(run: list[_Unit], pieces: int) -> list[list[_Unit]]:
    """``run`` cut into ``pieces`` contiguous parts of about equal weight."""
    total = sum(u.weight for u in run)
    out: list[list[_Unit]] = [[]]
    done = 0
    for i, u in enumerate(run):
        left = len(run) - i
        need = pieces - len(out)  # parts still to open after the current one
        if out[-1] and (done >= total * len(out) / pieces or left <= need) and need > 0:
            out.append([])
        out[-1].append(u)
        done += u.weight
    return out


def _globbable(part: list[_Unit]) -> list[list[_Unit]]:
    """``part`` in as few pieces as one glob each can name (cut where the tens digit changes)."""
    if _pattern(part) is not None:
        return [part]
    pieces: list[list[_Unit]] = []
    for u in part:
        if pieces and _pattern([*pieces[-1], u]) is not None:
            pieces[-1].append(u)
        else:
            pieces.append([u])
    return pieces


def _stages(units: list[_Unit], max_stages: int) -> list[list[_Unit]]:
    runs = _runs(units)
    pieces = [1] * len(runs)
    while sum(pieces) < max_stages:
        splittable = [i for i, r in enumerate(runs) if len(r) > pieces[i]]
        if not splittable:
            break
        i = max(splittable, key=lambda j: sum(u.weight for u in runs[j]) / pieces[j])
        pieces[i] += 1
    stages: list[list[_Unit]] = []
    for run, n in zip(runs, pieces, strict=True):
        for part in _split(run, n):
            stages.extend(_globbable(part))
    return stages


def _prune_high(i: int, n: int) -> float:
    # deeper stages are wider and more redundant: 0.5 at the front up to 0.75 at the back
    frac = i / (n - 1) if n > 1 else 0.0
    return round(PRUNE_STEP * int((0.5 + 0.25 * frac) / PRUNE_STEP + 1e-9), 10)


def auto_space(
    model: nn.Module,
    example_input: Any,
    *,
    name: str | None = None,
    max_stages: int = MAX_STAGES,
    graph: ModelGraph | None = None,
) -> SearchSpace:
    """A search space derived from ``model``'s own graph (see the module docstring).

    Args:
        model: the model to compress (not modified).
        example_input: one batch it accepts (a tensor, or a dict of tensors).
        name: names the space and its source (``auto:<name>``); default :func:`model_name`.
        max_stages: stages to gather the layers into (more when blocks cannot share a glob).
        graph: an :func:`analyze` result to reuse (it is computed otherwise).

    Returns:
        A :class:`SearchSpace` whose rules name only ``model``'s modules.

    Raises:
        ValueError: ``max_stages`` below 1, or a model with no Conv/Linear layer.
    """
    if isinstance(max_stages, bool) or not isinstance(max_stages, int) or max_stages < 1:
        raise ValueError(f"max_stages must be an integer >= 1, got {max_stages!r}")
    g = graph or analyze(model, example_input)
    if not g.quantizable:
        raise ValueError(f"{model_name(model)} has no Conv2d or Linear layer that runs in forward: "
                         "there is nothing to prune or quantize")
    label = name or model_name(model)
    prunable = set(g.prunable)
    quantizable = set(g.quantizable)
    rest = [n for n in g.quantizable if n not in (g.stem, g.head)]
    stages = _stages(_units(model, rest), max_stages) if rest else []

    rules: list[dict[str, Any]] = []
    if g.stem in quantizable:
        rules.append({"name": "stem", "pattern": g.stem, "bits": PROTECTED_BITS})
    if g.head in quantizable:  # (a model that is one Linear is named "": "*" matches it)
        rules.append({"name": "head", "pattern": g.head or "*", "bits": PROTECTED_BITS})
    for i, stage in enumerate(stages):
        layers = [n for u in stage for n in u.layers]
        rule: dict[str, Any] = {"name": f"stage{i + 1}", "pattern": _pattern(stage), "bits": STAGE_BITS}
        if any(n in prunable for n in layers):
            rule["prune"] = {"low": 0.0, "high": _prune_high(i, len(stages)), "step": PRUNE_STEP}
        rules.append(rule)

    default = SearchSpace.default().to_dict()
    widths = [grp.channels for grp in g.groups]
    data = {
        "name": f"auto-{label}",
        "description": (f"Derived from {label}'s graph: {len(stages)} stage(s) of its blocks with "
                        "4/8/32-bit weights and structured pruning; stem and classifier head "
                        "protected (8/32 bits, no pruning rule of their own)."),
        "layers": rules,
        "defaults": {"bits": 8, "prune": 0.0},
        "distill": default["distill"],
        "finetune": default["finetune"],
        # multiples of 8 run fastest on CPU, but only where layers are wide enough to keep some
        "round_to": 8 if widths and min(widths) >= 16 else None,
    }
    return SearchSpace.from_dict(data, source=f"auto:{label}")


def _clean(value: Any) -> Any:
    # the YAML a person would write: no nulls, no keys at their default
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if v is None or (k == "per_layer" and v is False) or (k == "log" and v is False):
                continue
            if k == "description" and v == "":
                continue
            out[k] = _clean(v)
        return out
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def space_to_yaml(space: SearchSpace, header: str | None = None) -> str:
    """``space`` as a YAML file to edit, with a header comment saying where it came from.

    The text loads back (:meth:`SearchSpace.from_yaml`) to the same space (same fingerprint).

    Example:
        >>> s = SearchSpace.from_dict({"layers": [{"pattern": "fc", "bits": [8, 32]}]}, source="auto:x")
        >>> print(space_to_yaml(s).splitlines()[0])
        # Search space auto:x
    """
    lines = [f"Search space {space.source}"]
    if header:
        lines += header.splitlines()
    elif space.source.startswith("auto:"):
        lines += [
            "Derived by autoshrink from the model's own graph: its Conv/Linear layers in forward",
            "order, gathered into stages along its top-level blocks; the stem (first layer) and the",
            "classifier head (last layer) are protected (8/32 bits, no pruning). Patterns are fnmatch",
            "globs over module names and the first rule that matches a layer wins. Edit freely, then",
            "pass the file with --space FILE (see `autoshrink plan` for what each rule matches).",
        ]
    body = yaml.safe_dump(_clean(space.to_dict()), sort_keys=False, default_flow_style=None, width=100)
    comment = "\n".join(f"# {line}".rstrip() for line in lines)
    return f"{comment}\n{body}"

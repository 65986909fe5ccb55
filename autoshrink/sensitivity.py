"""Per-layer sensitivity: how much accuracy one layer (or one search-space rule) costs alone.

For each layer, every other layer stays fp32 and unpruned, and there is no fine-tune, so the
numbers isolate what *that* layer's bit-width or pruning ratio does to the teacher:

- ``bits``: ``Candidate(bits={layer: b}, default_bits=32)`` → :func:`~autoshrink.compress.compress`
  → post-training quantization calibrated on :meth:`Task.calibration_batches` → ``lower`` →
  accuracy of the lowered (real int8) model;
- ``prune``: ``Candidate(prune={layer: r}, default_bits=32)`` → ``compress`` → accuracy of the
  pruned fp32 model. The classifier head is never pruned, so it has no prune rows.

The drop (teacher accuracy minus compressed accuracy, in points, on the same first ``limit``
validation samples) is an upper bound of what a fine-tune will leave: layers that lose a lot
here are the ones to keep at higher precision, and :func:`narrow_space` turns the table into a
smaller search space. :func:`plot_sensitivity` draws it as a heatmap.

torch-pruning, torchao, matplotlib and rich are imported inside the functions that use them.

Long module (~600 lines): the sweep, the table, the narrowed space and the heatmap share one
row format; split by output only if a second table format appears.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from autoshrink._files import atomic_path
from autoshrink.candidate import ALLOWED_BITS, Candidate

if TYPE_CHECKING:
    import torch.nn as nn

    from autoshrink.space import LayerRule, SearchSpace
    from autoshrink.task import Task

__all__ = ["COLUMNS", "narrow_space", "plot_sensitivity", "reestimate_batchnorm", "sensitivity"]

#: Columns of the table :func:`sensitivity` returns.
COLUMNS = ("layer", "kind", "value", "accuracy", "drop", "params")

_BY = ("layer", "rule")
_KINDS = ("bits", "prune")


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


def sensitivity(
    task: Task,
    *,
    bits: Sequence[int] = (4, 8),
    prune: Sequence[float] = (0.25, 0.5, 0.75),
    layers: Sequence[str] | None = None,
    limit: int | None = 1000,
    by: str = "layer",
    space: SearchSpace | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> pd.DataFrame:
    """Accuracy drop of each layer (or rule) compressed alone, at each bit-width and pruning ratio.

    Every measurement changes one layer (``by="layer"``) or all layers of one search-space rule
    (``by="rule"``, first matching rule wins as in the search) and leaves the rest of the model
    fp32 and unpruned; nothing is fine-tuned. A quantized setting is calibrated (PTQ) on
    ``task.calibration_batches()`` and evaluated lowered; a pruned one is evaluated in fp32, its
    BatchNorm statistics re-estimated on the same batches (:func:`reestimate_batchnorm`).
    The 32-bit and 0.0-prune settings are the teacher itself (drop 0) and are not measured.

    Pruning follows dependencies: a layer coupled to others (the convolutions feeding one
    residual add, say) is pruned together with them, so coupled layers show the same prune
    rows, and ``params`` says how much really went.

    Args:
        task: the teacher and its data (the teacher is not modified).
        bits: weight bit-widths to try (each 4 or 8; 32 is skipped).
        prune: pruning ratios to try, each in [0, 1) (0.0 is skipped).
        layers: glob patterns over module names; only quantizable layers (Conv2d/Linear) that
            match one are measured. None: all of them.
        limit: evaluate on the first ``limit`` validation samples (None: all).
        by: ``"layer"`` (one row group per layer) or ``"rule"`` (one per rule of ``space``).
        space: the search space whose rules ``by="rule"`` measures (default: the bundled
            default space). Ignored for ``by="layer"``.
        progress: show a progress bar.
        device: where the teacher and the pruned fp32 models are evaluated (``"cpu"``,
            ``"cuda"``, ``"auto"``); quantized settings are lowered to int8 and evaluated on the
            CPU, as deployed.

    Returns:
        A DataFrame with one row per (layer or rule, setting) and columns ``layer`` (the layer
        name, or the rule's label for ``by="rule"``), ``kind`` (``"bits"`` or ``"prune"``),
        ``value`` (bit-width or ratio), ``accuracy`` (of the compressed model, in the task's
        metric), ``drop`` (teacher accuracy minus ``accuracy``, in points) and ``params`` (of the
        compressed model). ``df.attrs`` holds ``teacher_accuracy``, ``limit``, ``by`` and
        ``seconds``. A setting that fails to compress or run gets NaN accuracy and a warning.

    Raises:
        ValueError: an unknown ``by``; a bit-width or ratio that is not allowed; a ``layers``
            pattern that matches no quantizable layer; a ``limit`` below 1; nothing to measure;
            a ``device`` that is unknown or not available (``autoshrink.device.DeviceError``).
        autoshrink.SpaceError: (a ValueError) a rule of ``space`` that matches no layer.

    Example:
        >>> import autoshrink as ash
        >>> task = ash.tasks.get("digits")                          # doctest: +SKIP
        >>> df = sensitivity(task, layers=["layer1.*", "fc"], limit=500)  # doctest: +SKIP
        >>> df.pivot_table(index="layer", columns=["kind", "value"],
        ...                values="drop")                        # doctest: +SKIP
    """
    from autoshrink.compress.prune import find_head
    from autoshrink.compress.quantize import quantizable_layers
    from autoshrink.device import resolve_device

    resolve_device(device)  # a bad or unavailable device fails here, before any measuring
    if by not in _BY:
        raise ValueError(f"by must be one of {list(_BY)}, got {by!r}")
    bit_values = _check_bits(bits)
    prune_values = _check_prune(prune)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an integer >= 1, got {limit!r}")

    model = task.model
    x = task.example_input
    names = quantizable_layers(model)
    selected = _select_layers(names, layers)
    head = find_head(model, x)

    units: list[tuple[str, list[str]]]  # (label, layers changed together)
    if by == "layer":
        units = [(n, [n]) for n in selected]
    else:
        if space is None:
            from autoshrink.space import SearchSpace

            space = SearchSpace.default()
        space.bind(names)  # validates every rule against the model (SpaceError names the rule)
        keep = set(selected)
        units = [
            (label, [n for n in own if n in keep])
            for label, own in _rule_layers(space.rules(), names).items()
        ]
        units = [(label, own) for label, own in units if own]

    jobs: list[tuple[str, list[str], str, float]] = []
    for label, own in units:
        jobs += [(label, own, "bits", b) for b in bit_values]
        prunable = [n for n in own if n != head]  # the classifier head is never pruned
        if prunable:
            jobs += [(label, prunable, "prune", r) for r in prune_values]
    if not jobs:
        raise ValueError(
            f"nothing to measure: bits={list(bits)}, prune={list(prune)}, layers={layers!r}; "
            "give at least one bit-width below 32 or one ratio above 0"
        )

    start = time.perf_counter()
    calibration = list(task.calibration_batches())  # reused for every quantized setting
    teacher_accuracy, _ = task.evaluate(model.eval(), limit=limit, device=device)
    rows = []
    with _progress_bar(progress, len(jobs)) as advance:
        for label, own, kind, value in jobs:
            setting = f"{int(value)}b" if kind == "bits" else f"p{value:g}"
            advance(f"{label} {setting}")
            try:
                with warnings.catch_warnings():
                    # torch.export/deepcopy internals warn about their own deprecations: noise
                    warnings.simplefilter("ignore", FutureWarning)
                    accuracy, params = _measure(task, own, kind, value, calibration, limit, device)
            except Exception as exc:  # one layer failing must not lose the others' results
                warnings.warn(
                    f"sensitivity: {label} at {setting} failed ({type(exc).__name__}: {exc}); "
                    "its accuracy is NaN",
                    stacklevel=2,
                )
                accuracy, params = math.nan, math.nan
            rows.append(
                {
                    "layer": label,
                    "kind": kind,
                    "value": float(value),
                    "accuracy": accuracy,
                    "drop": teacher_accuracy - accuracy,
                    "params": params,
                }
            )
        advance(None)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.attrs.update(
        teacher_accuracy=teacher_accuracy,
        limit=limit,
        by=by,
        seconds=time.perf_counter() - start,
    )
    return df


def _measure(
    task: Task,
    layers: list[str],
    kind: str,
    value: float,
    calibration: list,
    limit: int | None,
    device: str = "cpu",
) -> tuple[float, int]:
    """Accuracy and parameter count with ``layers`` alone set to ``value`` bits or prune ratio."""
    from autoshrink.compress import compress
    from autoshrink.compress.quantize import lower, prepare_ptq

    x = task.example_input
    if kind == "bits":
        candidate = Candidate(bits={n: int(value) for n in layers}, default_bits=32)
        compressed = compress(task.model, candidate, x)
        prepared = prepare_ptq(compressed.pruned, candidate, x, calibration)
        model: nn.Module | Callable = lower(prepared)
        device = "cpu"  # the int8 model runs where it is deployed
    else:
        candidate = Candidate(prune={n: float(value) for n in layers}, default_bits=32)
        compressed = compress(task.model, candidate, x)
        model = reestimate_batchnorm(compressed.pruned, calibration)
    params = sum(p.numel() for p in compressed.pruned.parameters())
    accuracy, _ = task.evaluate(model, limit=limit, device=device)
    return float(accuracy), int(params)


def reestimate_batchnorm(model: nn.Module, batches: Sequence[Any]) -> nn.Module:
    """``model`` in eval mode, its BatchNorm running statistics re-estimated on ``batches``.

    Removing channels changes the statistics of every BatchNorm after them; the stored ones are
    the unpruned model's, so a pruned model scored with them understates what the structure
    keeps (the drop is mostly stale statistics, fixed by the first fine-tune steps). As
    Once-for-all scores its sub-networks, the statistics are reset and averaged again over a few
    training batches (forward only, no gradient, no weight changes). A model without BatchNorm,
    or no batches, is returned as it is, in eval mode.
    """
    import torch
    from torch import nn

    from autoshrink import _batches

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or not batches:
        return model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an exponential one
    model.train()
    with torch.no_grad():
        for batch in batches:
            _batches.call(model, batch)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


def _check_bits(bits: Sequence[int]) -> list[int]:
    out = []
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int) or b not in ALLOWED_BITS:
            raise ValueError(f"bits: {b!r} is not one of {list(ALLOWED_BITS)}")
        if b < 32 and b not in out:
            out.append(b)
    return sorted(out)


def _check_prune(prune: Sequence[float]) -> list[float]:
    out = []
    for r in prune:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            raise ValueError(f"prune: {r!r} is not a ratio in [0, 1)")
        if r > 0 and float(r) not in out:
            out.append(float(r))
    return sorted(out)


def _select_layers(names: list[str], patterns: Sequence[str] | None) -> list[str]:
    if patterns is None:
        return list(names)
    if isinstance(patterns, str):  # a lone pattern, not a list of one-character patterns
        patterns = [patterns]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"layers: {p!r} matches no quantizable layer of the model (its layers: {shown})"
            )
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _rule_layers(rules: Sequence[LayerRule], names: Sequence[str]) -> dict[str, list[str]]:
    """Rule label -> the layers it sets: those its pattern matches that no earlier rule took."""
    taken: set[str] = set()
    out: dict[str, list[str]] = {}
    for rule in rules:
        own = [n for n in names if fnmatch.fnmatchcase(n, rule.pattern) and n not in taken]
        taken.update(own)
        out[rule.label] = own
    return out


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[str | None], None]]:
    """Yield ``advance(description)``: call it before each measurement and with None at the end."""
    from autoshrink._progress import Bar

    with Bar("sensitivity", total, extra="· {task.fields[setting]}", fields={"setting": ""}, enabled=enabled) as bar:
        started = False

        def advance(description: str | None) -> None:
            nonlocal started
            if started:
                bar.advance()
            started = True
            bar.update(setting=description or "done")

        yield advance


# --------------------------------------------------------------------------------------------
# plotting
# --------------------------------------------------------------------------------------------


def _setting_label(kind: str, value: float) -> str:
    return f"{int(value)}b" if kind == "bits" else f"p{value:g}"


def _check_table(df: pd.DataFrame) -> None:
    needed = ("layer", "kind", "value", "drop")
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame from sensitivity(), got {type(df).__name__}")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(
            f"the table lacks column(s) {missing}; pass the DataFrame sensitivity() returns "
            f"(columns {list(COLUMNS)})"
        )
    kinds = sorted(set(df["kind"]) - set(_KINDS))
    if kinds:
        raise ValueError(f"kind: {kinds} not one of {list(_KINDS)}")


def _drop_matrix(df: pd.DataFrame) -> pd.DataFrame:
    """Rows: layers in the table's order; columns: settings (bits ascending, then ratios
    ascending) labelled ``4b``, ``p0.25``; values: drop in points (NaN where not measured)."""
    _check_table(df)
    if df.empty:
        raise ValueError("the sensitivity table is empty: nothing to plot")
    settings = sorted(
        {(k, float(v)) for k, v in zip(df["kind"], df["value"], strict=True)},
        key=lambda kv: (_KINDS.index(kv[0]), kv[1]),
    )
    layers = list(dict.fromkeys(df["layer"]))
    labels = [_setting_label(k, v) for k, v in settings]
    matrix = pd.DataFrame(math.nan, index=layers, columns=labels)
    cells = zip(df["layer"], df["kind"], df["value"], df["drop"], strict=True)
    for layer, kind, value, drop in cells:
        matrix.loc[layer, _setting_label(kind, float(value))] = drop
    return matrix


def plot_sensitivity(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Draw a sensitivity table as a heatmap PNG: one row per layer, one column per setting.

    Colour is the accuracy drop in points on a symmetric-log scale (so a 0.5-point drop is
    visible next to a 60-point one), and each cell is annotated with its drop; cells that were
    not measured (the head is never pruned) are grey with a dash. A negative drop (the
    compressed model scored higher, within noise) is coloured as 0 and annotated as it is.

    Args:
        df: the DataFrame :func:`sensitivity` returns.
        path: the PNG to write (through a temporary file and ``os.replace``); parent folders
            are created.

    Returns:
        The path written.

    Raises:
        ValueError: a table that is empty or lacks the ``layer``/``kind``/``value``/``drop``
            columns.
        TypeError: ``df`` is not a DataFrame.

    Example:
        >>> import tempfile, pathlib
        >>> df = pd.DataFrame({"layer": ["conv1", "conv1", "fc"], "kind": ["bits", "prune", "bits"],
        ...                    "value": [4, 0.5, 4], "drop": [0.4, 12.0, 1.5]})
        >>> out = plot_sensitivity(df, pathlib.Path(tempfile.mkdtemp()) / "sens.png")
        >>> out.read_bytes()[:4] == b"\\x89PNG"
        True
    """
    matrix = _drop_matrix(df)
    title = "Accuracy drop (points), one layer compressed alone, no fine-tune"
    teacher = df.attrs.get("teacher_accuracy")
    if teacher is not None:
        limit = df.attrs.get("limit")
        on = f"first {limit}" if limit else "all"
        title += f"\nteacher accuracy {teacher:.2f} ({on} validation samples)"
    with atomic_path(path) as tmp:
        _render_heatmap(matrix, title, tmp)
    return Path(path)


def _render_heatmap(matrix: pd.DataFrame, title: str, path: Path) -> None:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import SymLogNorm
    from matplotlib.figure import Figure

    values = matrix.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    longest = max(len(str(i)) for i in matrix.index)
    width = max(5.0, 1.6 + 0.075 * longest + 0.75 * n_cols)
    height = max(2.6, 1.4 + 0.32 * n_rows)
    # A bare Figure with its own Agg canvas: no pyplot global state, safe in threads and workers.
    fig = Figure(figsize=(width, height), dpi=130, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    finite = values[np.isfinite(values)]
    vmax = max(float(finite.max()) if finite.size else 1.0, 1.0)
    norm = SymLogNorm(linthresh=1.0, linscale=1.0, vmin=0.0, vmax=vmax, base=10)
    cmap = colormaps["YlOrRd"].with_extremes(bad="#dddddd")
    shown = np.ma.masked_invalid(np.clip(values, 0.0, None))  # a gain is drawn as no drop
    image = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")

    fontsize = 8 if n_rows <= 40 else 6
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            if not np.isfinite(v):
                ax.text(j, i, "–", ha="center", va="center", fontsize=fontsize, color="#777777")
                continue
            r, g, b, _ = cmap(norm(max(v, 0.0)))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            text = f"{v:.1f}" if abs(v) < 99.95 else f"{v:.0f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black")

    ax.set_xticks(range(n_cols), list(matrix.columns), fontsize=9)
    ax.set_yticks(range(n_rows), [str(i) for i in matrix.index], fontsize=fontsize)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("setting (b: weight bits, p: fraction of output channels pruned)", fontsize=8)
    n_bits = sum(str(c).endswith("b") for c in matrix.columns)
    if 0 < n_bits < n_cols:  # separate the quantization columns from the pruning ones
        ax.axvline(n_bits - 0.5, color="#444444", linewidth=1.5)
    ax.tick_params(length=0)
    # thin white grid between cells
    ax.set_xticks(np.arange(-0.5, n_cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(image, ax=ax, shrink=min(1.0, 6.0 / max(n_rows, 1) + 0.5), pad=0.02)
    bar.set_label("drop (points, symlog)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------------------------
# narrowing a search space
# --------------------------------------------------------------------------------------------


def narrow_space(space: SearchSpace, df: pd.DataFrame, *, max_drop: float = 1.0) -> SearchSpace:
    """A copy of ``space`` without the settings that alone cost more than ``max_drop`` points.

    For each layer rule, the rows of ``df`` that belong to it are found, then:

    - **bits** (a list of choices): a bit-width is removed when its *worst* drop over the rule's
      layers exceeds ``max_drop``. 32 is never removed. If every choice would go (a rule
      without 32), the one with the smallest worst drop is kept, with a warning.
    - **prune** (a list of choices or a ``{low, high, step}`` range): capped at the largest
      measured ratio below the first (smallest) measured ratio whose worst drop exceeds
      ``max_drop``; 0.0 is never removed. A range's ``high`` is lowered to the cap (on the
      range's step grid) and a range reduced to one value becomes that fixed value. If even the
      smallest choice exceeds the cap (a list or range not starting at 0), only that smallest
      choice is kept, with a warning.

    Fixed values (a single bit-width or ratio), rules without rows in ``df``, and settings
    ``df`` did not measure (or whose measurement failed: NaN) are left as they are: no evidence,
    no change. The drops are pessimistic (no fine-tune, one layer at a time; effects of several
    layers add up), so ``max_drop`` is a filter against hopeless settings, not a budget.

    Rows belong to a rule when their ``layer`` is the rule's label (a table from
    ``sensitivity(..., by="rule")``), otherwise when the rule's pattern matches their layer
    name and no earlier rule's pattern does (first match wins, as in the search).

    Args:
        space: the search space to narrow (not modified).
        df: a table from :func:`sensitivity` (columns ``layer``, ``kind``, ``value``, ``drop``).
        max_drop: the largest acceptable drop in points.

    Returns:
        A new, validated :class:`SearchSpace` whose ``source`` says it was narrowed.

    Raises:
        ValueError: ``max_drop`` is not a finite number; ``df`` lacks a needed column or has an
            unknown ``kind``.
        TypeError: ``df`` is not a DataFrame.

    Example:
        >>> from autoshrink.space import SearchSpace
        >>> space = SearchSpace.from_dict({"layers": [
        ...     {"pattern": "layer1.*", "bits": [4, 8, 32],
        ...      "prune": {"low": 0, "high": 0.5, "step": 0.25}}]})
        >>> df = pd.DataFrame({"layer": ["layer1.0.conv1"] * 4,
        ...                    "kind": ["bits", "bits", "prune", "prune"],
        ...                    "value": [4, 8, 0.25, 0.5], "drop": [3.0, 0.1, 0.4, 5.0]})
        >>> rule = narrow_space(space, df, max_drop=1.0).rules()[0]
        >>> rule.bits, rule.prune.high
        ([8, 32], 0.25)
    """
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not math.isfinite(
        max_drop
    ):
        raise ValueError(f"max_drop must be a finite number of points, got {max_drop!r}")
    _check_table(df)
    data = space.to_dict()
    rules = space.rules()
    labels = set(df["layer"])
    by_pattern = _rule_layers(rules, list(dict.fromkeys(df["layer"])))
    for i, rule in enumerate(rules):
        members = {rule.label} if rule.label in labels else set(by_pattern[rule.label])
        rows = df[df["layer"].isin(members)]
        if rows.empty:
            continue
        worst = _worst_drops(rows)
        where = f"{space.source}: layers[{i}] ({rule.label})"
        entry = data["layers"][i]
        entry["bits"] = _narrow_bits(rule.bits, worst.get("bits", {}), max_drop, where)
        entry["prune"] = _narrow_prune(entry["prune"], worst.get("prune", {}), max_drop, where)
    from autoshrink.space import SearchSpace

    return SearchSpace.from_dict(data, source=f"{space.source} (narrowed: max_drop={max_drop:g})")


def _worst_drops(rows: pd.DataFrame) -> dict[str, dict[float, float]]:
    """kind -> value -> worst (largest) measured drop; NaN drops (failed runs) are left out."""
    out: dict[str, dict[float, float]] = {}
    for kind, value, drop in zip(rows["kind"], rows["value"], rows["drop"], strict=True):
        if drop is None or not math.isfinite(float(drop)):
            continue
        table = out.setdefault(kind, {})
        key = round(float(value), 10)
        table[key] = max(table.get(key, -math.inf), float(drop))
    return out


def _narrow_bits(bits: Any, worst: dict[float, float], max_drop: float, where: str) -> Any:
    if not isinstance(bits, list) or len(bits) < 2:
        return bits  # fixed or unset: not a choice the search makes
    kept = [b for b in bits if b == 32 or worst.get(float(b), -math.inf) <= max_drop]
    if not kept:
        best = min(bits, key=lambda b: (worst.get(float(b), -math.inf), -b))
        warnings.warn(
            f"{where}: every bit choice {bits} drops more than {max_drop:g} points "
            f"({_fmt(worst)}); keeping {best}",
            stacklevel=3,
        )
        kept = [best]
    return kept


def _prune_cap(worst: dict[float, float], max_drop: float) -> float:
    """The largest measured ratio below the first one whose drop exceeds ``max_drop``."""
    cap = math.inf
    ok = 0.0
    for ratio in sorted(worst):
        if worst[ratio] > max_drop:
            cap = ok
            break
        ok = ratio
    return cap


def _narrow_prune(prune: Any, worst: dict[float, float], max_drop: float, where: str) -> Any:
    cap = _prune_cap(worst, max_drop)
    if math.isinf(cap) or prune is None or isinstance(prune, (int, float)):
        return prune
    if isinstance(prune, list):
        if len(prune) < 2:
            return prune
        kept = [r for r in prune if r == 0.0 or r <= cap + 1e-9]
        if not kept:
            kept = [min(prune)]
            _warn_prune(where, prune, kept[0], cap, max_drop)
        return kept
    # a range {low, high, step, log}
    low, high, step = float(prune["low"]), float(prune["high"]), prune.get("step")
    if cap >= high:
        return prune
    if cap < low:
        _warn_prune(where, prune, low, cap, max_drop)
        return low
    new_high = cap
    if step:
        new_high = round(low + math.floor((cap - low) / step + 1e-9) * step, 10)
    if new_high <= low:
        return low
    return {**prune, "high": new_high}


def _warn_prune(where: str, prune: Any, kept: float, cap: float, max_drop: float) -> None:
    warnings.warn(
        f"{where}: every prune choice {prune} is above {cap:g}, the largest ratio within "
        f"{max_drop:g} points; keeping {kept:g}",
        stacklevel=4,
    )


def _fmt(worst: dict[float, float]) -> str:
    return ", ".join(f"{v:g}: {d:.2f}" for v, d in sorted(worst.items()))

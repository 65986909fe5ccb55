"""Calibrating the per-layer latency table on whole-model timings the search already makes.

The table (:mod:`autoshrink.measure.predictor`) times each Conv2d / Linear alone and sums them.
What the sum misses, and each candidate's measure of it (no compilation, one forward pass at
batch 1 of the pruned model):

- ``int8_ms`` / ``fp32_ms``: the table entries of the int8 and the fp32 layers, apart: inside one
  graph a layer costs a fraction of its time alone (its own call overhead, input and output
  copies are shared), and that fraction differs between oneDNN's int8 and fp32 kernels;
- ``transitions``: quantize / dequantize between an fp32 and an int8 layer (in execution order,
  counting the model's fp32 input and output), each a pass over a tensor;
- ``layers``: a per-layer cost inside the graph (kernel launch, a buffer);
- ``ops`` / ``op_melems``: the non-conv operators (ReLU, residual adds, pooling, ...: every torch
  call that is not a conv, linear, batch norm or a view) and their output elements in millions;
  what Inductor does not fuse into a conv costs a pass over memory;
- ``call``: 1, the whole model's call overhead.

A :class:`Calibration` is a linear model over those features with non-negative coefficients
(``scipy.optimize.nnls``), fitted on relative error (each row divided by its measured latency, as
the goal is a median relative error), and evaluated held out (k-fold: each candidate predicted by
a model fitted without it; Kendall τ by ``scipy.stats.kendalltau``). The examples are stored as
:class:`Structure` records (table keys and counts, not table values) in a JSONL file beside the
table, so a re-measured table re-fits on them. :func:`screen` is the rule that rejects a
candidate whose prediction clears the budget by more than three held-out median errors.

Example:
    >>> cal = fit([[1.0, 2.0], [1.0, 4.0], [1.0, 6.0]], [1.5, 2.5, 3.5])
    >>> [round(c, 3) for c in cal]
    [0.5, 0.5]
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

__all__ = [
    "FEATURES",
    "GOAL_MEDIAN_ERROR",
    "GOAL_TAU",
    "MIN_EXAMPLES",
    "SCREEN_ERRORS",
    "Calibration",
    "ExampleStore",
    "Structure",
    "feature_vector",
    "fit",
    "held_out",
    "raw_sum",
    "score",
    "screen",
    "structure",
]

#: the features, in the order of a calibration's coefficients
FEATURES = ("call", "int8_ms", "fp32_ms", "transitions", "layers", "ops", "op_melems")
#: fewer recorded examples than this: the raw sum is used, no calibration is fitted
MIN_EXAMPLES = 8
#: the predictor's goal on held-out candidates; screening is on by default only where it is met
GOAL_TAU = 0.9
GOAL_MEDIAN_ERROR = 0.10
#: a candidate is screened when its prediction exceeds the budget by more than this many
#: held-out median relative errors
SCREEN_ERRORS = 3.0
CALL = "call"  # the table's entry for calling an empty compiled model (as predictor._EMPTY)

# torch calls that cost nothing in a compiled graph, or are counted as the table's layers
_FREE = ("conv", "linear", "batch_norm", "view", "reshape", "flatten", "contiguous", "size", "dim",
         "permute", "transpose", "squeeze", "unsqueeze", "expand", "detach", "clone", "to", "type",
         "__get__", "__setitem__", "numel", "float", "dropout", "identity")


@dataclass
class Structure:
    """What a candidate's compiled graph is made of, independent of the table's values.

    Args:
        layers: each Conv2d / Linear's table key (see ``predictor``), in execution order.
        transitions: fp32 ↔ int8 changes along that order (the fp32 input and output included).
        ops: non-conv operator calls.
        op_elements: their output elements in all (at batch 1).
        machine: the machine key the candidate was timed on (see ``predictor.machine_key``).
    """

    layers: list[str]
    transitions: int
    ops: int
    op_elements: int
    machine: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Structure:
        return cls(layers=list(d["layers"]), transitions=int(d["transitions"]), ops=int(d["ops"]),
                   op_elements=int(d["op_elements"]), machine=str(d.get("machine", "")))


class _OpCounter(torch.overrides.TorchFunctionMode):
    """Counts the non-free torch calls of a forward pass and their output elements."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.elements = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "").lower()
        if isinstance(out, torch.Tensor) and not any(f in name for f in _FREE):
            self.ops += 1
            self.elements += out.numel()
        return out


def structure(pruned: nn.Module, bits: dict[str, int], example_input: torch.Tensor, machine: str = "") -> Structure:
    """The :class:`Structure` of a pruned model with these per-layer bits (one batch-1 forward).

    Args:
        pruned: the pruned (not yet quantized) model.
        bits: layer name -> bits (absent: 32); below 32 runs int8 kernels.
        example_input: an input; its first sample is used.
        machine: the machine key to record with it.
    """
    from autoshrink import _batches
    from autoshrink._forward import run_with_hooks
    from autoshrink.measure.predictor import table_key

    order: list[tuple[str, str]] = []
    pre = {}
    for name, module in pruned.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(mod, args, _name=name):
                order.append((_name, table_key(mod, tuple(args[0].shape), bits.get(_name, 32))))
            pre[module] = hook
    x = _batches.first(example_input, 1)
    counter = _OpCounter()
    with counter:
        run_with_hooks(pruned, x, pre=pre)
    seen: dict[str, str] = {}
    for name, key in order:  # a layer called twice is one entry (as the table sees it)
        seen.setdefault(name, key)
    keys = list(seen.values())
    quant = [False] + [k.endswith(":q1") for k in keys] + [False]
    transitions = sum(a != b for a, b in zip(quant, quant[1:], strict=False))
    return Structure(keys, transitions, counter.ops, counter.elements, machine)


def raw_sum(s: Structure, table: dict[str, float]) -> float | None:
    """The table's own prediction: the call cost plus every layer's entry (None: an entry is missing)."""
    if CALL not in table or any(k not in table for k in s.layers):
        return None
    return table[CALL] + sum(table[k] for k in s.layers)


def feature_vector(s: Structure, table: dict[str, float]) -> list[float] | None:
    """The :data:`FEATURES` of ``s`` with the table's values (None: an entry is missing)."""
    if CALL not in table or any(k not in table for k in s.layers):
        return None
    int8 = sum(table[k] for k in s.layers if k.endswith(":q1"))
    fp32 = sum(table[k] for k in s.layers if not k.endswith(":q1"))
    return [table[CALL], int8, fp32, float(s.transitions), float(len(s.layers)), float(s.ops),
            s.op_elements / 1e6]


def fit(features: Sequence[Sequence[float]], measured_ms: Sequence[float]) -> list[float]:
    """Non-negative coefficients minimising the squared *relative* error (``scipy.optimize.nnls``
    on rows divided by their measured latency)."""
    import numpy as np
    from scipy.optimize import nnls

    x = np.asarray(features, dtype=float)
    y = np.asarray(measured_ms, dtype=float)
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"fit needs one feature row per measured latency, got {x.shape} rows and {len(y)} latencies")
    if (y <= 0).any():
        raise ValueError(f"measured latencies must be positive, got {sorted(y)[:3]}")
    coef, _ = nnls(x / y[:, None], np.ones_like(y))
    return [float(c) for c in coef]


def score(predicted: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """(Kendall τ by ``scipy.stats.kendalltau``, median relative error) of predictions against
    measurements (τ 0 where it is undefined, e.g. all predictions equal)."""
    from scipy.stats import kendalltau

    tau = float(kendalltau(predicted, measured).statistic) if len(measured) >= 2 else float("nan")
    err = statistics.median(abs(p - m) / m for p, m in zip(predicted, measured, strict=True))
    return (tau if math.isfinite(tau) else 0.0), float(err)


def held_out(features: Sequence[Sequence[float]], measured_ms: Sequence[float], raw: Sequence[float], *,
             folds: int = 5, seed: int = 0) -> dict:
    """k-fold held-out evaluation: each example predicted by a calibration fitted on the others'
    folds; the raw sum scored on the same examples.

    Returns:
        ``{"tau", "median_error", "raw_tau", "raw_median_error", "folds", "n"}``.
    """
    import numpy as np

    n = len(measured_ms)
    if n < 2:
        raise ValueError(f"held-out evaluation needs at least 2 examples, got {n}")
    k = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    x, y = np.asarray(features, dtype=float), np.asarray(measured_ms, dtype=float)
    predicted = np.empty(n)
    for part in np.array_split(order, k):
        train = np.setdiff1d(order, part)
        predicted[part] = x[part] @ np.asarray(fit(x[train], y[train]))
    tau, err = score(predicted.tolist(), y.tolist())
    raw_tau, raw_err = score(list(raw), y.tolist())
    return {"tau": tau, "median_error": err, "raw_tau": raw_tau, "raw_median_error": raw_err, "folds": k, "n": n}


@dataclass
class Calibration:
    """A fitted calibration of one machine's table, with its held-out scores.

    Args:
        coef: one non-negative coefficient per :data:`FEATURES` entry.
        n: examples it was fitted on.
        tau: held-out Kendall τ (k-fold).
        median_error: held-out median relative error.
        raw_tau: the raw sum's τ on the same examples.
        raw_median_error: the raw sum's median relative error on them.
        features: the feature names (checked on load).
    """

    coef: list[float]
    n: int
    tau: float
    median_error: float
    raw_tau: float = float("nan")
    raw_median_error: float = float("nan")
    features: list[str] = field(default_factory=lambda: list(FEATURES))

    @property
    def usable(self) -> bool:
        """Fitted on enough examples to replace the raw sum."""
        return self.n >= MIN_EXAMPLES

    @property
    def meets_goal(self) -> bool:
        """Held-out τ ≥ :data:`GOAL_TAU` and median error ≤ :data:`GOAL_MEDIAN_ERROR`, on enough examples."""
        return self.usable and self.tau >= GOAL_TAU and self.median_error <= GOAL_MEDIAN_ERROR

    def predict(self, vector: Sequence[float]) -> float:
        return float(sum(c * v for c, v in zip(self.coef, vector, strict=True)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration | None:
        """The calibration in ``d``, or None if it was made with other features (an older version)."""
        if list(d.get("features", [])) != list(FEATURES) or len(d.get("coef", [])) != len(FEATURES):
            return None
        return cls(coef=[float(c) for c in d["coef"]], n=int(d["n"]), tau=float(d["tau"]),
                   median_error=float(d["median_error"]), raw_tau=float(d.get("raw_tau", "nan")),
                   raw_median_error=float(d.get("raw_median_error", "nan")))

    @classmethod
    def from_examples(cls, vectors: Sequence[Sequence[float]], measured_ms: Sequence[float],
                      raw: Sequence[float], folds: int = 5) -> Calibration:
        """Fit on every example; score held out (k-fold)."""
        scores = held_out(vectors, measured_ms, raw, folds=folds)
        return cls(coef=fit(vectors, measured_ms), n=len(measured_ms), tau=scores["tau"],
                   median_error=scores["median_error"], raw_tau=scores["raw_tau"],
                   raw_median_error=scores["raw_median_error"])


def screen(predicted_ms: float, budget_ms: float, median_error: float) -> bool:
    """True if a candidate predicted at ``predicted_ms`` is to be rejected without compiling it:
    its prediction exceeds the budget by more than :data:`SCREEN_ERRORS` held-out median errors.

    Example:
        >>> screen(1.5, 1.0, 0.1), screen(1.25, 1.0, 0.1)
        (True, False)
    """
    if budget_ms <= 0 or median_error < 0:
        raise ValueError(f"screen needs a positive budget and a non-negative error, got {budget_ms}, {median_error}")
    return predicted_ms > budget_ms * (1 + SCREEN_ERRORS * median_error)


class ExampleStore:
    """Recorded (structure, measured latency) examples of one machine: a JSONL file, appended to.

    Each example is one line written with one ``write`` on a file opened for appending, under an
    exclusive ``flock``: drivers sharing the machine append without tearing each other's lines.
    A line that does not parse (a crash mid-write on another filesystem) is skipped on load.

    Args:
        path: the JSONL file (created on the first :meth:`add`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def add(self, s: Structure, measured_ms: float) -> None:
        """Append one example."""
        from autoshrink._files import append_line

        if not (isinstance(measured_ms, (int, float)) and measured_ms > 0 and math.isfinite(measured_ms)):
            raise ValueError(f"a recorded latency must be a positive number of ms, got {measured_ms!r}")
        append_line(self.path, json.dumps({"structure": s.to_dict(), "measured_ms": float(measured_ms)}))

    def load(self) -> list[tuple[Structure, float]]:
        """Every example recorded so far, oldest first."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
                out.append((Structure.from_dict(d["structure"]), float(d["measured_ms"])))
            except (ValueError, KeyError, TypeError):
                continue
        return out

"""Deployment runtimes: the model a search picks is timed, evaluated and shipped in one of them.

One small module per runtime, each a :class:`Runtime` with four verbs (``build`` the deployable
artifact from the lowered graph, ``save`` it, ``load`` it, ``usage_snippet`` to run it without
autoshrink); the deployable it returns is a callable ``deployable(x) -> logits``:

- ``inductor``: ``torch.compile`` with freezing, oneDNN int8 kernels; ships ``model.pt2`` (torch alone);
- ``onnxruntime``: the QDQ ONNX model on ONNX Runtime's CPU provider; ships ``model.onnx``
  (``pip install "autoshrink[onnxruntime]"``);
- ``openvino``: the same graph on OpenVINO's CPU plugin; ships ``model.xml``/``model.bin``
  (``pip install "autoshrink[openvino]"``).

Example:
    >>> import torch
    >>> rt = get("inductor")
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    >>> dep = rt.build(model, torch.randn(1, 4))                              # doctest: +SKIP
    >>> time_runtime(dep, torch.randn(1, 4), runs=50).info.runtime            # doctest: +SKIP
    'inductor'
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from autoshrink.measure.latency import Latency, MachineLock, measure_latency
from autoshrink.runtimes._base import Deployable, MissingRuntimeError, Runtime, RuntimeInfo

__all__ = [
    "DEFAULT",
    "Deployable",
    "MissingRuntimeError",
    "Runtime",
    "RuntimeInfo",
    "RuntimeLatency",
    "available",
    "evaluate",
    "fp32_in_runtime",
    "get",
    "list_runtimes",
    "time_lowered",
    "time_runtime",
    "usage_snippet",
]

DEFAULT = "inductor"

# name -> (module, class); a module is imported only when its runtime is asked for
_REGISTRY = {
    "inductor": ("autoshrink.runtimes.inductor", "InductorRuntime"),
    "onnxruntime": ("autoshrink.runtimes.onnxruntime", "OnnxRuntime"),
    "openvino": ("autoshrink.runtimes.openvino", "OpenVinoRuntime"),
}


def list_runtimes() -> list[str]:
    """Names :func:`get` accepts (installed or not).

    Example:
        >>> list_runtimes()
        ['inductor', 'onnxruntime', 'openvino']
    """
    return list(_REGISTRY)


def get(name: str = DEFAULT) -> Runtime:
    """The runtime called ``name``.

    Raises:
        ValueError: an unknown name (the known ones are listed).
        MissingRuntimeError: its optional dependencies are not installed; the message is one
            line with the install command, e.g. ``pip install "autoshrink[onnxruntime]"``.

    Example:
        >>> get("inductor").name
        'inductor'
    """
    if name not in _REGISTRY:
        close = [n for n in _REGISTRY if str(name) and n.startswith(str(name).lower())]
        close = close or difflib.get_close_matches(str(name).lower(), list(_REGISTRY), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown runtime {name!r}: choose one of {list_runtimes()}.{hint}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)()


def available() -> list[str]:
    """The runtimes whose dependencies are installed here."""
    out = []
    for name in _REGISTRY:
        try:
            get(name)
        except MissingRuntimeError:
            continue
        out.append(name)
    return out


def usage_snippet(runtime: str, folder, threads: int = 1) -> str:
    """Python that loads and runs ``folder``'s artifact with ``runtime`` alone (for ``best/README.md``).

    Example:
        >>> print(usage_snippet("inductor", "best").splitlines()[0])
        import torch
    """
    return get(runtime).usage_snippet(folder, threads)


@dataclass(frozen=True)
class RuntimeLatency(Latency):
    """A :class:`~autoshrink.measure.latency.Latency` with the runtime that timed it."""

    info: RuntimeInfo | None = None


def time_runtime(
    deployable: Deployable,
    example_input: torch.Tensor,
    *,
    runs: int = 60,
    warmup: int = 10,
    threads: int | None = None,
    lock: MachineLock | None = None,
) -> RuntimeLatency:
    """Batch-1 latency of ``deployable``, by the rules of :func:`~autoshrink.measure.latency.measure_latency`.

    A first untimed call (under ``lock``'s shared side), ``warmup`` calls, then the median and
    quartiles of ``runs`` timed calls, all inside ``lock.measuring()``. The thread count is the
    deployable's own (its session was built with it); ONNX Runtime and OpenVINO are called with a
    prepared float32 numpy array, so only the runtime's call is timed.

    Args:
        deployable: from ``get(name).build(...)`` or ``.load(...)``.
        example_input: an input; only its first sample is used.
        runs, warmup: as for ``measure_latency``.
        threads: if given, must equal the deployable's thread count (a check, not a setting).
        lock: the machine lock.

    Raises:
        ValueError: ``threads`` differs from the deployable's, or bad ``runs``/``warmup``.
    """
    info = deployable.info
    if threads is not None and threads != info.threads:
        raise ValueError(
            f"the {info.runtime} deployable runs with {info.threads} thread(s), not {threads}: "
            f"build or load it with threads={threads}"
        )
    if info.runtime == "inductor":
        fn = deployable
    else:
        x1 = np.ascontiguousarray(example_input[:1].detach().cpu().float().numpy())

        def fn(_x, run=deployable.run, x1=x1):
            return run(x1)

    lat = measure_latency(fn, example_input, runs=runs, warmup=warmup, threads=info.threads, lock=lock)
    return RuntimeLatency(**asdict(lat), info=info)


def fp32_in_runtime(deployable: Deployable, bits: dict[str, int]) -> dict[str, str]:
    """Layers the plan quantizes (``bits`` < 32) that this runtime still runs with float kernels,
    and why: for the per-layer plan, where they show as fp32 rather than as a silent int8.

    Args:
        deployable: built from the plan's lowered model.
        bits: weight bits per layer, as :class:`autoshrink.compress.Compressed` resolved them.

    Returns:
        layer -> reason; empty when the runtime does not expose its kernels (Inductor) or runs
        every quantized layer in int8.

    Example:
        >>> class _D(Deployable):
        ...     def run(self, x): return x
        ...     def kernels(self): return {"conv1": "int8", "fc": "fp32"}
        >>> fp32_in_runtime(_D(RuntimeInfo("onnxruntime", "1.20", 1), []), {"conv1": 8, "fc": 8})
        {'fc': 'onnxruntime 1.20 runs it with a float kernel on dequantized int8 weights (no int8 kernel for it there)'}
    """
    kernels = deployable.kernels() or {}
    info = deployable.info
    return {
        layer: f"{info.runtime} {info.version} runs it with a float kernel on dequantized int8 weights "
               "(no int8 kernel for it there)"
        for layer, b in bits.items() if b < 32 and kernels.get(layer) == "fp32"
    }


def time_lowered(
    runtime: str,
    lowered: torch.nn.Module,
    example_input: torch.Tensor,
    *,
    runs: int = 60,
    warmup: int = 10,
    threads: int = 1,
    lock: MachineLock | None = None,
) -> RuntimeLatency:
    """Build ``lowered`` in ``runtime`` and time it (the budget gate's measurement in one call).

    The build (export, conversion, compilation) is heavy work and runs under ``lock``'s shared
    side, as training does; the timing then takes the lock exclusively (:func:`time_runtime`).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
        >>> time_lowered("onnxruntime", m, torch.randn(1, 8), runs=5).info.runtime   # doctest: +SKIP
        'onnxruntime'
    """
    import contextlib

    rt = get(runtime)
    with lock.training() if lock is not None else contextlib.nullcontext():
        deployable = rt.build(lowered, example_input, threads=threads)
    return time_runtime(deployable, example_input, runs=runs, warmup=warmup, lock=lock)


def evaluate(
    deployable: Deployable,
    data: Iterable,
    *,
    pad_to: int | None = None,
) -> tuple[float, float]:
    """Top-1 accuracy (in %) and its binomial standard error of ``deployable`` on ``data``.

    Args:
        deployable: any runtime's deployable (numpy in, numpy out).
        data: batches of ``(inputs, labels)`` (a ``DataLoader``), tensors or arrays.
        pad_to: pad a short last batch to this size, so that a shape-specialised model
            (Inductor) compiles once; the padded rows are dropped before scoring.

    Returns:
        ``(accuracy, standard_error)`` in points. For another metric, ``Task.evaluate(deployable)``
        runs it too (a deployable takes and returns torch tensors as well).
    """
    correct = total = 0
    for x, y in data:
        x = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        n = len(x)
        if pad_to is not None and n < pad_to:
            x = np.concatenate([x, np.zeros((pad_to - n, *x.shape[1:]), np.float32)])
        logits = np.asarray(deployable.run(x))[:n]
        correct += int((logits.argmax(-1) == y).sum())
        total += n
    if total == 0:
        raise ValueError("evaluate needs at least one batch of data, got none")
    p = correct / total
    return 100.0 * p, 100.0 * math.sqrt(p * (1 - p) / total)

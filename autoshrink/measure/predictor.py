"""Predicted latency: a per-machine lookup table of per-layer latencies, summed.

For screening and ranking candidates only, never for the budget: the measured latency of the
lowered, compiled model decides the budget for every candidate that is fine-tuned.

Each table entry is one Conv2d or Linear layer alone, lowered and compiled as a trial's model is
(PT2E int8 for bits below 32, since 4-bit weights run the same int8 kernels; fp32 otherwise;
Inductor with freezing), timed at batch 1, minus the cost of calling an empty compiled model.
A candidate's prediction is that call cost once plus its layers' entries; what the table does
not see (activations, residual adds, pooling, the fusions between layers) is the error left.

Entries are keyed by (kind, in/out channels, kernel, stride, padding, groups, input size, int8)
and measured once per machine and runtime: the table is a JSON file under
``AUTOSHRINK_CACHE/latency_tables`` named after the host, CPU model, thread count, torch version
and the deployment runtime with its version (Inductor by default; ONNX Runtime and OpenVINO time
each layer in themselves); entries missing from it are measured on first use (a few seconds
each) and saved.

Example:
    >>> pred = LatencyPredictor.for_machine()                                    # doctest: +SKIP
    >>> pred.predict(task.model, Candidate.uniform(bits=8, prune=0.5), task.example_input)  # doctest: +SKIP
    1.84
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path

import torch
import torch.nn as nn

from autoshrink._forward import run_with_hooks

__all__ = ["LatencyPredictor", "layer_inputs"]

_EMPTY = "call"  # the table's entry for calling an empty compiled model


def _machine_key(threads: int, runtime: str = "inductor") -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from autoshrink.runtimes import get as get_runtime

    version = get_runtime(runtime).version()
    text = f"{platform.node()}|{cpu}|{os.cpu_count()}|{threads}|{torch.__version__}|{runtime}|{version}"
    return f"{platform.node()}-{runtime}-{threads}t-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def layer_inputs(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Each Conv2d / Linear layer of ``model`` with the shape of its input at batch 1."""
    found: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
    pre = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(mod, args, _name=name):
                found.setdefault(_name, (mod, tuple(args[0].shape)))
            pre[module] = hook
    run_with_hooks(model, example_input[:1], pre=pre)
    return found


def _key(module: nn.Module, shape: tuple[int, ...], bits: int) -> str:
    q = int(bits < 32)
    if isinstance(module, nn.Conv2d):
        return (f"conv:{module.in_channels}:{module.out_channels}:{module.kernel_size[0]}x{module.kernel_size[1]}:"
                f"s{module.stride[0]}:p{module.padding[0]}:g{module.groups}:{shape[-2]}x{shape[-1]}:q{q}")
    return f"linear:{module.in_features}:{module.out_features}:{'x'.join(map(str, shape[1:]))}:q{q}"


class LatencyPredictor:
    """Per-layer latency table of one machine; predicts a candidate's latency in milliseconds.

    Args:
        path: the table's JSON file (created if missing).
        threads: torch threads while timing (as the search's ``latency_threads``).
        runs: timed calls per entry.
        runtime: the deployment runtime each entry is timed in (as the search's ``runtime``).
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1, runs: int = 30, runtime: str = "inductor") -> None:
        self.path = Path(path)
        self.threads, self.runs, self.runtime = threads, runs, runtime
        self.table: dict[str, float] = {}
        if self.path.is_file():
            self.table = {k: float(v) for k, v in json.loads(self.path.read_text()).items()}

    @classmethod
    def for_machine(cls, threads: int = 1, runs: int = 30, runtime: str = "inductor") -> LatencyPredictor:
        """The table of this machine and runtime, in ``AUTOSHRINK_CACHE/latency_tables``."""
        from autoshrink._env import cache_dir

        return cls(cache_dir() / "latency_tables" / f"{_machine_key(threads, runtime)}.json", threads, runs, runtime)

    # -- prediction -------------------------------------------------------------------------------
    def predict(self, model: nn.Module, candidate, example_input: torch.Tensor) -> float:
        """Predicted batch-1 latency (ms) of ``candidate`` applied to ``model``: it is pruned
        (cheap, no compilation), then its layers are looked up (measured if new)."""
        from autoshrink.compress import compress

        comp = compress(model, candidate, example_input)
        return self.predict_pruned(comp.pruned, comp.bits, example_input)

    def predict_pruned(self, pruned: nn.Module, bits: dict[str, int], example_input: torch.Tensor) -> float:
        """Predicted latency (ms) of an already pruned model with these per-layer bits."""
        total = self._entry(_EMPTY, self._time_empty)
        for name, (module, shape) in layer_inputs(pruned, example_input).items():
            b = bits.get(name, 32)
            total += self._entry(_key(module, shape, b), functools.partial(self._time_layer, module, shape, b))
        return total

    # -- the table --------------------------------------------------------------------------------
    def _entry(self, key: str, measure) -> float:
        if key not in self.table:
            value = measure()
            self.table[key] = value if key == _EMPTY else max(0.0, value - self.table[_EMPTY])
            self._save()
        return self.table[key]

    def _save(self) -> None:
        from autoshrink._files import write_text_atomic

        write_text_atomic(self.path, json.dumps(self.table, indent=0, sort_keys=True))

    def _time(self, model: nn.Module, x: torch.Tensor) -> float:
        from autoshrink.compress.quantize import compile_cpu
        from autoshrink.measure.latency import MachineLock, measure_latency

        if self.runtime != "inductor":
            from autoshrink.runtimes import time_lowered

            return time_lowered(self.runtime, model, x, runs=self.runs, warmup=5, threads=self.threads,
                                lock=MachineLock()).median_ms
        try:
            lat = measure_latency(compile_cpu(model), x, runs=self.runs, warmup=5, threads=self.threads,
                                  lock=MachineLock())
        finally:
            torch._dynamo.reset()  # many small graphs: do not let them pile up
        return lat.median_ms

    def _time_empty(self) -> float:
        class _Scale(nn.Module):
            def forward(self, x):
                return x * 1.0

        return self._time(_Scale().eval(), torch.randn(1, 8))

    def _time_layer(self, module: nn.Module, shape: tuple[int, ...], bits: int) -> float:
        from autoshrink.candidate import Candidate
        from autoshrink.compress.quantize import lower, prepare_ptq

        if isinstance(module, nn.Conv2d):
            layer = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                              module.padding, groups=module.groups, bias=True)
        else:
            layer = nn.Linear(module.in_features, module.out_features)
        model = nn.Sequential(layer).eval()
        x = torch.randn(1, *shape[1:])
        if bits < 32:
            calib = [torch.randn(8, *shape[1:]) for _ in range(2)]
            model = lower(prepare_ptq(model, Candidate(bits={"0": 8}, default_bits=32), x, calib))
        return self._time(model, x)

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

The sum misses what a whole graph adds or shares (quantize / dequantize between fp32 and int8
layers, the non-conv ops, each layer's call overhead inside one graph): every candidate a search
times is recorded beside the table (:meth:`LatencyPredictor.record`, a JSONL file) and
:meth:`LatencyPredictor.calibrate` fits a non-negative linear model over those features
(:mod:`autoshrink.measure.calibration`), stored beside the table with its held-out Kendall τ and
median error; once fitted on at least ``MIN_EXAMPLES`` examples, predictions are calibrated.

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
from autoshrink.measure.calibration import Calibration, ExampleStore, Structure, feature_vector, raw_sum, structure

__all__ = ["LatencyPredictor", "layer_inputs", "machine_key", "record_example", "table_key"]

_EMPTY = "call"  # the table's entry for calling an empty compiled model


def machine_key(threads: int, runtime: str = "inductor") -> str:
    """The name of this machine's table: host, CPU model, cores, torch threads, torch version and the
    runtime with its version (the host, runtime and threads readable, the rest hashed)."""
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


_machine_key = machine_key  # the earlier name


def _tables_dir() -> Path:
    from autoshrink._env import cache_dir

    return cache_dir() / "latency_tables"


def record_example(s: Structure | dict, measured_ms: float) -> bool:
    """Append one calibration example to the store of the machine it was timed on (its
    ``machine`` key); False if it names no machine (nothing is recorded)."""
    s = s if isinstance(s, Structure) else Structure.from_dict(s)
    if not s.machine:
        return False
    ExampleStore(_tables_dir() / f"{s.machine}.examples.jsonl").add(s, measured_ms)
    return True


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


def table_key(module: nn.Module, shape: tuple[int, ...], bits: int) -> str:
    """The table's key of a Conv2d / Linear with this batch-1 input shape, int8 when ``bits < 32``."""
    q = int(bits < 32)
    if isinstance(module, nn.Conv2d):
        return (f"conv:{module.in_channels}:{module.out_channels}:{module.kernel_size[0]}x{module.kernel_size[1]}:"
                f"s{module.stride[0]}:p{module.padding[0]}:g{module.groups}:{shape[-2]}x{shape[-1]}:q{q}")
    return f"linear:{module.in_features}:{module.out_features}:{'x'.join(map(str, shape[1:]))}:q{q}"


_key = table_key  # the earlier name


def _layer_from_key(key: str) -> tuple[nn.Module, tuple[int, ...], int]:
    """The layer, input shape and bits a table key stands for (to time an entry only a recorded
    example names)."""
    parts = key.split(":")
    bits = 8 if parts[-1] == "q1" else 32
    if parts[0] == "conv":
        cin, cout = int(parts[1]), int(parts[2])
        kh, kw = (int(v) for v in parts[3].split("x"))
        h, w = (int(v) for v in parts[7].split("x"))
        conv = nn.Conv2d(cin, cout, (kh, kw), int(parts[4][1:]), int(parts[5][1:]), groups=int(parts[6][1:]))
        return conv, (1, cin, h, w), bits
    if parts[0] == "linear":
        dims = tuple(int(v) for v in parts[3].split("x"))
        return nn.Linear(int(parts[1]), int(parts[2])), (1, *dims), bits
    raise ValueError(f"not a latency-table layer key: {key!r}")


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
        self.calibration: Calibration | None = None
        if self.calibration_path.is_file():
            try:
                self.calibration = Calibration.from_dict(json.loads(self.calibration_path.read_text()))
            except (ValueError, KeyError, TypeError):
                self.calibration = None  # unreadable: as if never fitted (calibrate() rewrites it)

    @classmethod
    def for_machine(cls, threads: int = 1, runs: int = 30, runtime: str = "inductor") -> LatencyPredictor:
        """The table of this machine and runtime, in ``AUTOSHRINK_CACHE/latency_tables``."""
        return cls(_tables_dir() / f"{machine_key(threads, runtime)}.json", threads, runs, runtime)

    @property
    def calibration_path(self) -> Path:
        """The fitted calibration's JSON file, beside the table."""
        return self.path.with_name(f"{self.path.stem}.calibration.json")

    @property
    def examples(self) -> ExampleStore:
        """The recorded (structure, measured latency) examples of this table, beside it."""
        return ExampleStore(self.path.with_name(f"{self.path.stem}.examples.jsonl"))

    @property
    def machine(self) -> str:
        """The table's machine key (its file name)."""
        return self.path.stem

    # -- prediction -------------------------------------------------------------------------------
    def predict(self, model: nn.Module, candidate, example_input: torch.Tensor) -> float:
        """Predicted batch-1 latency (ms) of ``candidate`` applied to ``model``: it is pruned
        (cheap, no compilation), then its layers are looked up (measured if new)."""
        from autoshrink.compress import compress

        comp = compress(model, candidate, example_input)
        return self.predict_pruned(comp.pruned, comp.bits, example_input)

    def predict_pruned(self, pruned: nn.Module, bits: dict[str, int], example_input: torch.Tensor) -> float:
        """Predicted latency (ms) of an already pruned model with these per-layer bits: calibrated
        when a usable calibration exists (see :meth:`calibrate`), else the raw sum."""
        return self.predict_structure(structure(pruned, bits, example_input, self.machine))

    def predict_structure(self, s: Structure, *, measure_missing: bool = True,
                          calibrated: bool = True) -> float | None:
        """Predicted latency (ms) of a candidate's :class:`Structure`.

        Args:
            s: the candidate's structure (:func:`autoshrink.measure.calibration.structure`).
            measure_missing: time the table entries it lacks (seconds each); False: None if any is missing.
            calibrated: use the calibration when a usable one exists; False: the raw sum.
        """
        if measure_missing:
            self._fill(s.layers)
        if calibrated and self.calibration is not None and self.calibration.usable:
            vector = feature_vector(s, self.table)
            return None if vector is None else max(0.0, self.calibration.predict(vector))
        return raw_sum(s, self.table)

    def structure(self, pruned: nn.Module, bits: dict[str, int], example_input: torch.Tensor) -> Structure:
        """The candidate's :class:`Structure` on this machine (no timing, no compilation)."""
        return structure(pruned, bits, example_input, self.machine)

    # -- calibration ------------------------------------------------------------------------------
    def record(self, s: Structure | dict, measured_ms: float) -> None:
        """Add one training example: a candidate's structure and its measured latency (ms) on this
        machine, appended to :attr:`examples`."""
        s = s if isinstance(s, Structure) else Structure.from_dict(s)
        if s.machine and s.machine != self.machine:
            raise ValueError(f"an example timed on {s.machine!r} cannot calibrate the table of {self.machine!r}")
        self.examples.add(s, measured_ms)

    def calibrate(self, *, measure_missing: bool = False, folds: int = 5) -> Calibration | None:
        """Refit the calibration on every recorded example and store it beside the table.

        Args:
            measure_missing: time the table entries the examples name and the table lacks
                (seconds each); False: examples with a missing entry are left out.
            folds: k of the k-fold held-out evaluation.

        Returns:
            The new calibration, or None with fewer than 2 usable examples (nothing is stored then).
        """
        from autoshrink._files import write_text_atomic

        rows, measured, raw = [], [], []
        for s, ms in self.examples.load():
            if measure_missing:
                self._fill(s.layers)
            vector = feature_vector(s, self.table)
            if vector is None:
                continue
            rows.append(vector)
            measured.append(ms)
            raw.append(raw_sum(s, self.table))
        if len(rows) < 2:
            return None
        self.calibration = Calibration.from_examples(rows, measured, raw, folds=folds)
        write_text_atomic(self.calibration_path, json.dumps(self.calibration.to_dict(), indent=1))
        return self.calibration

    # -- the table --------------------------------------------------------------------------------
    def _fill(self, keys: list[str]) -> None:
        """Time the entries among ``keys`` (and the empty call) that the table lacks."""
        self._entry(_EMPTY, self._time_empty)
        for key in keys:
            if key not in self.table:
                module, shape, bits = _layer_from_key(key)
                self._entry(key, functools.partial(self._time_layer, module, shape, bits))

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

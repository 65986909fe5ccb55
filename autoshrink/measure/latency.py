"""Honest latency: batch-1 wall time of the deployable (lowered, compiled) model.

- a fixed number of threads (default 1, the usual edge deployment) for the whole measurement;
- warm-up runs first (compilation, caches, oneDNN primitive creation), then the median of
  ``runs`` timed calls; the inter-quartile range is kept to show the noise;
- **isolation**: on one machine, no two trials time at once and nobody trains while a trial
  times. Trainers hold a shared lock and the timer an exclusive one (``flock``, so it also
  works across processes, Ray workers and concurrent searches); a turnstile lock gives the
  timer priority, so a busy machine cannot starve it.
- **on the target**: in a Ray cluster, the node that stands for the deployment hardware offers a
  custom resource (``ray start --resources '{"latency_target": 1}'``); a :class:`LatencyMeter`
  actor pinned there times every trial's lowered model, sent as ``torch.export`` program bytes
  (:func:`program_bytes`), under that node's own machine lock.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from autoshrink import _batches
from autoshrink.measure.fresh import MachineLock  # torch-free: the runtime-only timing process takes it too

__all__ = ["Latency", "LatencyMeter", "MachineLock", "fixed_threads", "measure_latency", "program_bytes", "time_calls"]


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int
    threads: int
    p90_ms: float | None = None


@contextlib.contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Torch intra-op threads set to ``n`` inside the block (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def time_calls(
    fn: Callable[[torch.Tensor], object],
    x: torch.Tensor,
    runs: int,
    *,
    timer: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Wall time in ms of each of ``runs`` calls ``fn(x)`` (no warm-up, no lock: the caller's).

    ``timer`` is a seconds clock (``time.perf_counter``; tests pass a fake one).

    Example:
        >>> len(time_calls(torch.nn.Linear(8, 8), torch.randn(1, 8), 3))
        3
    """
    times = []
    for _ in range(runs):
        start = timer()
        _batches.call(fn, x)
        times.append((timer() - start) * 1e3)
    return times


def measure_latency(
    fn: Callable[[torch.Tensor], object],
    example_input: torch.Tensor,
    *,
    runs: int = 60,
    warmup: int = 10,
    threads: int = 1,
    lock: MachineLock | None = None,
) -> Latency:
    """Median batch-1 latency of ``fn`` in milliseconds.

    Args:
        fn: the deployable model (e.g. the output of :func:`autoshrink.compress.quantize.compile_cpu`).
        example_input: an input; only its first sample is used (batch 1).
        runs: timed calls (at least 50 is the project's rule for reported figures).
        warmup: untimed calls first (after one call that triggers compilation).
        threads: torch intra-op threads while timing.
        lock: the machine lock; timing happens inside ``lock.measuring()``.

    Example:
        >>> lat = measure_latency(torch.nn.Linear(8, 8), torch.randn(1, 8), runs=5, warmup=1)
        >>> lat.median_ms > 0
        True
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    x = _batches.first(example_input, 1)
    with fixed_threads(threads), torch.inference_mode():
        # compilation is heavy work: done under the shared lock, like training, so it never
        # disturbs another trial's timing; the timing itself then takes the lock exclusively
        with lock.training() if lock is not None else contextlib.nullcontext():
            _batches.call(fn, x)
        with lock.measuring() if lock is not None else contextlib.nullcontext():
            for _ in range(warmup):
                _batches.call(fn, x)
            times = time_calls(fn, x, runs)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    p90 = statistics.quantiles(times, n=10)[8] if len(times) >= 2 else times[0]
    return Latency(statistics.median(times), q[0], q[2], runs, threads, p90)


def program_bytes(lowered: torch.nn.Module, example_input: torch.Tensor, *, dynamic_batch: bool = False) -> bytes:
    """The lowered model as ``torch.export`` program bytes at batch 1, to time it elsewhere.

    ``dynamic_batch=True`` keeps the batch dimension dynamic (the ONNX Runtime and OpenVINO
    builds re-export the program with a dynamic batch, which a batch-1 program refuses).

    Example:
        >>> data = program_bytes(torch.nn.Linear(8, 8).eval(), torch.randn(1, 8))
        >>> LatencyMeter().measure(data, torch.randn(1, 8), runs=5).median_ms > 0   # doctest: +SKIP
        True
    """
    buf = io.BytesIO()
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        args, kwargs, dynamic = _batches.export_args(_batches.batch_of_two(example_input), batch)
        ep = torch.export.export(lowered, args, kwargs, dynamic_shapes=dynamic, strict=False)
    else:
        args, kwargs, _ = _batches.export_args(_batches.first(example_input, 1), None)
        ep = torch.export.export(lowered, args, kwargs, strict=False)
    torch.export.save(ep, buf)
    return buf.getvalue()


class LatencyMeter:
    """Times lowered models on the machine it runs on (a Ray actor on the latency target).

    Each :meth:`measure` loads a ``torch.export`` program, compiles it exactly as a local trial
    would (Inductor with freezing, int8 kernels) and times it with :func:`measure_latency`
    inside this machine's :class:`MachineLock`, so trainers on the same node pause meanwhile.

    Args:
        lock_dir: the machine lock's folder (default as :class:`MachineLock`).
    """

    def __init__(self, lock_dir: str | os.PathLike | None = None) -> None:
        from autoshrink import _env

        _env.configure()
        self._lock_dir = lock_dir
        self._lock = MachineLock(lock_dir)
        self.measured = 0

    def where(self) -> dict:
        """The host this meter times on (and its Ray node, when it runs in Ray)."""
        out = {"host": socket.gethostname(), "pid": os.getpid()}
        try:
            import ray

            if ray.is_initialized():
                out["node_id"] = ray.get_runtime_context().get_node_id()
        except ImportError:  # pragma: no cover - ray is a dependency, but not of this module
            pass
        return out

    def measure(self, program: bytes, example_input: torch.Tensor, runs: int = 60,
                threads: int = 1, runtime: str = "inductor") -> Latency:
        """Median batch-1 latency of the program in ``program`` (see :func:`program_bytes`), in
        ``runtime`` (Inductor: compiled as a local trial would; another runtime: built in it, and
        the result is an :class:`autoshrink.runtimes.RuntimeLatency` naming its version)."""
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the int8 ops to load)

        from autoshrink.compress.quantize import compile_cpu

        if runtime != "inductor":
            from autoshrink.runtimes import time_lowered  # lazy: the runtimes time with this module

            try:
                return time_lowered(runtime, torch.export.load(io.BytesIO(program)).module(), example_input,
                                    runs=runs, threads=threads, lock=self._lock)
            finally:
                self.measured += 1
        model = compile_cpu(torch.export.load(io.BytesIO(program)).module())
        try:
            return measure_latency(model, example_input, runs=runs, threads=threads, lock=self._lock)
        finally:
            self.measured += 1
            del model
            torch._dynamo.reset()  # a long-lived meter compiles many graphs: free them

    def count(self) -> int:
        """How many models this meter has timed."""
        return self.measured

    def remeasure(self, programs: dict[str, bytes], example_input: torch.Tensor, **kwargs):
        """Re-time shipped artifacts (``model.pt2`` bytes by name) on this machine, in a fresh
        process, interleaved (:func:`autoshrink.measure.remeasure.remeasure_programs`)."""
        from autoshrink.measure.remeasure import remeasure_programs

        kwargs.setdefault("lock_dir", self._lock_dir)
        return remeasure_programs(programs, example_input, **kwargs)

"""The runtime alone: time ONNX Runtime / OpenVINO artifacts in a process without torch.

A user deploys ``model.onnx`` or ``model.xml`` in a process that has the runtime and numpy, not
torch, and a process with torch loaded reads the same OpenVINO file about 4 % slower (1.179 ms
against 1.129 ms for one ResNet-18 artifact, minutes apart on a quiet machine). So the finalists'
re-timing "as shipped" of these runtimes (:func:`autoshrink.measure.remeasure.remeasure`) runs
this file as a script, ``python -I .../fresh.py ...``: an isolated interpreter that imports the
standard library, numpy and the one runtime, and asserts that neither torch nor autoshrink got in.
``experiments/check_runtime_export.py`` opens artifacts with the same settings from here.

Keep this module to the standard library at module level (numpy and the runtimes are imported
inside functions): it runs on its own, outside the package, and the package takes from it what
both sides must agree on: the runtimes' settings (:func:`ort_session_options`,
:func:`openvino_config`) and the machine lock's protocol (:class:`MachineLock`).

The child writes JSON to ``--out``: per artifact folder its ``rounds x runs`` timings in ms (or
why it could not be loaded), the load average just before timing and the imported-modules check.
The parent computes the spread (:func:`autoshrink.measure.remeasure.spread`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = ["ARTIFACTS", "MachineLock", "main", "open_artifact", "openvino_config", "openvino_core",
           "ort_session_options", "add_timing_arguments", "error_line"]

#: Runtime -> the file of its artifact in a trial's (or ``best/``) folder.
ARTIFACTS = {"onnxruntime": "model.onnx", "openvino": "model.xml"}


class MachineLock:
    """Readers-writer lock across processes on one machine: training shares it, timing owns it.

    Two ``flock`` files in one folder: trainers hold the main one shared, a timer holds it
    exclusive, and a turnstile taken first gives a waiting timer priority over new trainers (so a
    busy machine cannot starve it). Works across processes, Ray workers and concurrent searches.

    Args:
        folder: where the lock files live (one per machine; default ``$AUTOSHRINK_LOCK_DIR``, else
            the temp folder).
    """

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        base = Path(folder or os.environ.get("AUTOSHRINK_LOCK_DIR") or tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        self._rw = base / "autoshrink-latency.lock"
        self._turnstile = base / "autoshrink-latency-turnstile.lock"

    @contextlib.contextmanager
    def _flock(self, path: Path, mode: int) -> Iterator[None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Exclusive: no other timing and no training runs meanwhile."""
        with self._flock(self._turnstile, fcntl.LOCK_EX), self._flock(self._rw, fcntl.LOCK_EX):
            yield

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Shared: trainers run together, but wait while someone is timing.

        Hold it for one step of work at a time (a training step, an evaluation batch, a
        compilation), not for a whole fine-tune: a waiting timer gets in between two steps.
        """
        with self._flock(self._turnstile, fcntl.LOCK_EX):
            pass  # a waiting timer holds the turnstile: new trainers queue behind it
        with self._flock(self._rw, fcntl.LOCK_SH):
            yield


def ort_session_options(threads: int, optimized_path: str | os.PathLike | None = None, *, layout: bool = True):
    """The ONNX Runtime session the search times and ships: all graph optimisations, fixed
    intra-op threads, one inter-op thread, sequential execution.

    ``layout=False`` stops before the layout optimisations (``ORT_ENABLE_EXTENDED``): the
    precision of each kernel is decided by then (the QDQ fusions are extended-level), and the
    float convs still carry their weights' names (NCHWc layout renames them).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if layout
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only (writing the optimized model warns about NCHWc layouts)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def openvino_config(threads: int) -> dict:
    """The OpenVINO CPU plugin settings the search times and ships (float layers pinned to fp32:
    on CPUs with bf16 the plugin would otherwise run them in bf16)."""
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}


_OV_CORE = None


def openvino_core():
    """The process's one ``openvino.Core`` (created on first use, never destroyed before exit).

    Each Core's CPU plugin installs an alternate signal stack on the thread that first compiles
    with it and, when destroyed, puts back the stack it found there, even if that one has since
    been freed by another Core: Cores destroyed out of order leave the thread on an unmapped
    stack, and the next signal handled on it (CPython runs its handlers there: the SIGCHLD of a
    DataLoader worker, Ctrl-C) kills the process with a segmentation fault. One Core for the whole
    process cannot be destroyed out of order; OpenVINO's documentation also recommends one.
    """
    global _OV_CORE
    if _OV_CORE is None:
        import openvino as ov

        _OV_CORE = ov.Core()
    return _OV_CORE


def open_artifact(runtime: str, folder: str | os.PathLike, threads: int) -> tuple[Callable, str]:
    """``(run, version)``: ``run(array)`` -> the first output of ``folder``'s artifact in ``runtime``,
    opened with the settings the search timed; ``version`` the runtime's."""
    if runtime not in ARTIFACTS:
        raise ValueError(f"runtime {runtime!r}: expected one of {sorted(ARTIFACTS)}")
    path = Path(folder) / ARTIFACTS[runtime]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {runtime} artifact there")
    if runtime == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), ort_session_options(threads), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return (lambda a: session.run(None, {name: a})[0]), ort.__version__
    import openvino as ov

    if not path.with_suffix(".bin").is_file():
        raise FileNotFoundError(f"{path.with_suffix('.bin')}: the weights of {path} are missing")
    request = openvino_core().compile_model(str(path), "CPU", openvino_config(threads)).create_infer_request()
    return (lambda a: request.infer({0: a})[0]), ov.get_version()


def _time_calls(run: Callable, x, n: int) -> list[float]:
    """Wall time in ms of each of ``n`` calls (as ``autoshrink.measure.latency.time_calls``)."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        run(x)
        out.append((time.perf_counter() - start) * 1e3)
    return out


def time_interleaved(calls: Sequence[Callable], x, *, rounds: int, runs: int, warmup: int,
                     lock: MachineLock | None, time_calls: Callable = _time_calls) -> list[list[list[float]]]:
    """The interleaved re-timing loop (:func:`autoshrink.measure.remeasure.time_interleaved` runs
    it for torch models): the first call of each under the lock's shared side (compilation is
    heavy work, like training), then warm-up and ``rounds`` rounds of A B C ... blocks, each
    starting with one untimed call, under its exclusive side. ``time_calls(fn, x, n)`` gives
    the ``n`` timings of one block. Returns, per callable, ``rounds`` lists of ``runs`` ms."""
    shared = lock.training if lock is not None else contextlib.nullcontext
    exclusive = lock.measuring if lock is not None else contextlib.nullcontext
    with shared():
        for fn in calls:
            fn(x)
    times: list[list[list[float]]] = [[] for _ in calls]
    with exclusive():
        for fn in calls:
            for _ in range(warmup):
                fn(x)
        for _ in range(rounds):
            for i, fn in enumerate(calls):
                fn(x)  # the others ran meanwhile: one untimed call brings this one's caches back
                times[i].append(list(time_calls(fn, x, runs)))
    return times


def cpu_window(seconds: float) -> dict | None:
    """``/proc/stat`` before and after ``seconds`` of sleep, and this process's CPUs: what
    :func:`autoshrink.measure.load.busy_cores` reads, taken here and parsed by the parent (this
    process imports nothing of autoshrink's). None off Linux."""
    try:
        before = Path("/proc/stat").read_text()
        time.sleep(seconds)
        after = Path("/proc/stat").read_text()
    except OSError:
        return None
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    return {"stat": [before, after], "cpus": cpus}


def error_line(exc: BaseException) -> str:
    """Why an artifact could not be loaded or timed, in one line: the type and the first line."""
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:500]}"


def add_timing_arguments(p: argparse.ArgumentParser, input_help: str) -> None:
    """The options both re-timing processes take (this one and ``autoshrink.measure.remeasure``'s)."""
    p.add_argument("--input", required=True, help=input_help)
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lock-dir", default=None)
    p.add_argument("--window-s", type=float, default=0.25, help="seconds of the busy-CPU window before timing")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the runtime-only timing process; writes JSON to ``--out``."""
    p = argparse.ArgumentParser(prog="python -I fresh.py", description=__doc__.splitlines()[0])
    p.add_argument("--runtime", required=True, choices=sorted(ARTIFACTS))
    add_timing_arguments(p, "a .npy array: the example input (its first sample is timed)")
    p.add_argument("folders", nargs="+", help="artifact folders (each holds the runtime's file)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.runs < 1 or args.warmup < 0:
        p.error(f"rounds >= 1, runs >= 1 and warmup >= 0 must hold, got {args.rounds}, {args.runs}, {args.warmup}")

    import numpy as np

    x = np.ascontiguousarray(np.load(args.input).astype(np.float32)[:1])
    lock = MachineLock(args.lock_dir)
    results: list[dict] = [{"folder": folder} for folder in args.folders]
    runs_of, timed = [], []
    for entry in results:
        try:
            run, _ = open_artifact(args.runtime, entry["folder"], args.threads)
        except Exception as exc:  # noqa: BLE001 - a runtime's many error types: listed, the others timed
            entry["error"] = error_line(exc)
            continue
        runs_of.append(run)
        timed.append(entry)
    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):
        load = None
    window = cpu_window(args.window_s)
    if runs_of:
        times = time_interleaved(runs_of, x, rounds=args.rounds, runs=args.runs, warmup=args.warmup, lock=lock)
        for entry, t in zip(timed, times, strict=True):
            entry["times_ms"] = t
    payload = {"results": results, "loadavg": load, "cpu_window": window, "host": socket.gethostname(),
               "imported": sorted(m for m in ("torch", "autoshrink") if m in sys.modules)}
    tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

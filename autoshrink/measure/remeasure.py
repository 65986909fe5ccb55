"""Re-time finalists as shipped: their saved artifacts, in one fresh process, interleaved.

A trial's gate latency is taken once, before the fine-tune, on ``lower(prepare_ptq(pruned))``;
what ships is ``trials/NNNN/model.pt2``, the lowered QAT student (conv-BN folded differently),
and a single 60-run median rests on one moment of a shared machine. This module times the
artifacts themselves:

- in **one fresh process** (``python -m autoshrink.measure.remeasure``, JSON out): nothing of the
  search (Ray, its compiled graphs, its allocator state) is left in it, and each artifact is
  loaded and compiled exactly as a user loads it (:func:`autoshrink.export.load_deployable`); an
  ONNX Runtime or OpenVINO artifact in an isolated interpreter with that runtime and numpy only
  (:mod:`autoshrink.measure.fresh`), as it is deployed: with torch loaded, OpenVINO read ~4 % slow;
- **interleaved**: after every model's compilation and warm-up, ``rounds`` rounds of ``runs``
  timed calls each, A B C A B C ..., so that a burst of load on the machine hits all of them
  alike instead of deciding between them; each model's block starts with one untimed call, so
  that its ``runs`` calls see the warm caches that :func:`~autoshrink.measure.latency.measure_latency`
  sees;
- inside the machine lock (:meth:`MachineLock.measuring`), at fixed threads, with the same
  timed call as the gate (:func:`~autoshrink.measure.latency.time_calls`);
- reported with its spread: median, p25, p75, p90 and a bootstrap interval of the median that
  resamples whole rounds (a slow round moves all of its samples together, so resampling single
  calls would make the interval too narrow). The machine's load is sampled before timing.

Long module (~560 lines): the parent side, the child process entry point and the statistics
that both sides agree on stay in one file, so the JSON between them is defined in one place.

Example:
    >>> out = remeasure(["runs/demo/trials/0003/model.pt2"], x)          # doctest: +SKIP
    >>> out.spreads["runs/demo/trials/0003/model.pt2"].median_ms         # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from autoshrink.measure import fresh
from autoshrink.measure.latency import MachineLock, fixed_threads, time_calls
from autoshrink.measure.load import WINDOW_S, busy_cores, load_warning, sample_load

__all__ = [
    "DEPLOYED_COLUMNS",
    "RemeasureError",
    "Remeasured",
    "Spread",
    "TrialRetimer",
    "bootstrap_median_interval",
    "remeasure",
    "remeasure_programs",
    "spread",
    "time_interleaved",
]

#: ``Spread`` field -> trials column, for the re-measured (deployed) figure.
DEPLOYED_COLUMNS = {
    "median_ms": "latency_ms_deployed",
    "p25_ms": "latency_deployed_p25_ms",
    "p75_ms": "latency_deployed_p75_ms",
    "p90_ms": "latency_deployed_p90_ms",
    "ci_low_ms": "latency_deployed_ci_low_ms",
    "ci_high_ms": "latency_deployed_ci_high_ms",
}

_DEFAULT_LOADER = "autoshrink.export:load_deployable"


class RemeasureError(RuntimeError):
    """The re-timing process failed or timed out (the message carries its last output)."""


@dataclass(frozen=True)
class Spread:
    """One model's re-timed latency: quantiles of all timed calls, and the median's interval.

    ``ci_low_ms``/``ci_high_ms`` bound the median at ``confidence`` (a bootstrap over rounds).
    """

    median_ms: float
    p25_ms: float
    p75_ms: float
    p90_ms: float
    ci_low_ms: float
    ci_high_ms: float
    runs: int  # timed calls in all
    rounds: int
    threads: int
    confidence: float = 0.95

    def columns(self) -> dict[str, float]:
        """The figures under their ``trials.csv`` names (:data:`DEPLOYED_COLUMNS`)."""
        d = asdict(self)
        return {col: d[name] for name, col in DEPLOYED_COLUMNS.items()}

    @property
    def interval(self) -> tuple[float, float]:
        """The bootstrap interval of the median, ``(low, high)`` in ms."""
        return (self.ci_low_ms, self.ci_high_ms)


@dataclass(frozen=True)
class Remeasured:
    """What one re-timing process returned.

    Attributes:
        spreads: artifact path (as given) -> its :class:`Spread`, for those that loaded.
        errors: artifact path -> why it could not be loaded or timed (not timed, not fatal).
        load: the machine's load just before timing (:func:`autoshrink.measure.load.sample_load`).
        warning: a one-line noisy-machine warning, or None.
        host: where it ran.
    """

    spreads: dict[str, Spread]
    errors: dict[str, str] = field(default_factory=dict)
    load: dict = field(default_factory=dict)
    warning: str | None = None
    host: str = ""


# --------------------------------------------------------------------------------------------
# statistics (pure numpy)
# --------------------------------------------------------------------------------------------


def bootstrap_median_interval(
    times_ms: Sequence[Sequence[float]] | np.ndarray,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of all calls, resampling whole rounds.

    Args:
        times_ms: ``rounds x runs`` timings (one row per round); a flat sequence counts as one
            call per round.
        resamples: bootstrap resamples (seeded, so the interval is reproducible).
        confidence: coverage of the interval, in (0, 1).
        seed: the generator's seed.

    Returns:
        ``(low, high)`` in ms.

    Raises:
        ValueError: no timings, ragged rounds, ``resamples < 1`` or ``confidence`` outside (0, 1).

    Example:
        >>> lo, hi = bootstrap_median_interval([[1.0, 1.1], [1.2, 1.0], [1.1, 1.3]])
        >>> 1.0 <= lo <= hi <= 1.3
        True
    """
    try:
        arr = np.asarray(times_ms, dtype=float)
    except ValueError as exc:
        raise ValueError(f"timings must be rounds of equal length: {exc}") from None
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"timings must be a non-empty rounds x runs table, got shape {arr.shape}")
    if resamples < 1:
        raise ValueError(f"`resamples >= 1` must hold, but got resamples={resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`0 < confidence < 1` must hold, but got confidence={confidence!r}")
    rng = np.random.default_rng(seed)
    rounds = arr.shape[0]
    picks = rng.integers(0, rounds, size=(resamples, rounds))
    medians = np.median(arr[picks].reshape(resamples, -1), axis=1)
    lo, hi = np.quantile(medians, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def spread(
    times_ms: Sequence[Sequence[float]] | np.ndarray,
    *,
    threads: int = 1,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Spread:
    """Median, p25, p75, p90 of all timed calls and the median's bootstrap interval.

    Args:
        times_ms: ``rounds x runs`` timings of one model.
        threads: the threads they were taken at (recorded).
        resamples, confidence, seed: as :func:`bootstrap_median_interval`.

    Example:
        >>> s = spread([[1.0, 2.0], [3.0, 4.0]])
        >>> s.median_ms, s.runs, s.rounds
        (2.5, 4, 2)
    """
    arr = np.asarray(times_ms, dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    lo, hi = bootstrap_median_interval(arr, resamples=resamples, confidence=confidence, seed=seed)
    p25, p50, p75, p90 = np.percentile(arr, [25, 50, 75, 90])
    return Spread(
        median_ms=float(p50), p25_ms=float(p25), p75_ms=float(p75), p90_ms=float(p90),
        ci_low_ms=lo, ci_high_ms=hi, runs=int(arr.size), rounds=int(arr.shape[0]),
        threads=int(threads), confidence=float(confidence),
    )


# --------------------------------------------------------------------------------------------
# the timing loop
# --------------------------------------------------------------------------------------------


def time_interleaved(
    models: Sequence[Callable[[torch.Tensor], object]],
    example_input: torch.Tensor,
    *,
    rounds: int = 10,
    runs: int = 10,
    warmup: int = 10,
    threads: int = 1,
    lock: MachineLock | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> list[np.ndarray]:
    """Time several models in turn: warm each, then ``rounds`` rounds of A B C ... blocks.

    Args:
        models: deployable callables (compiled: the first call compiles, outside the timing).
        example_input: an input; only its first sample is used (batch 1).
        rounds: how many times the models take turns.
        runs: timed calls per model per round.
        warmup: untimed calls per model before the first round.
        threads: torch intra-op threads throughout.
        lock: the machine lock; compilation holds its shared side, the timing its exclusive side.
        timer: a seconds clock (``time.perf_counter``; tests pass a fake one).

    Returns:
        One ``rounds x runs`` array of milliseconds per model, in the order given.

    Example:
        >>> lin = torch.nn.Linear(8, 8)
        >>> [t.shape for t in time_interleaved([lin, lin], torch.randn(1, 8), rounds=2, runs=3, warmup=1)]
        [(2, 3), (2, 3)]
    """
    if rounds < 1 or runs < 1 or warmup < 0:
        raise ValueError(
            f"rounds >= 1, runs >= 1 and warmup >= 0 must hold, got rounds={rounds}, runs={runs}, warmup={warmup}"
        )
    x = example_input[:1].contiguous()
    with fixed_threads(threads), torch.inference_mode():
        times = fresh.time_interleaved(models, x, rounds=rounds, runs=runs, warmup=warmup, lock=lock,
                                       time_calls=lambda fn, x, n: time_calls(fn, x, n, timer=timer))
    return [np.asarray(t, dtype=float) for t in times]


# --------------------------------------------------------------------------------------------
# the fresh process: parent side
# --------------------------------------------------------------------------------------------


def remeasure(
    paths: Sequence[str | os.PathLike],
    example_input: torch.Tensor,
    *,
    rounds: int = 10,
    runs: int = 10,
    warmup: int = 10,
    threads: int = 1,
    lock_dir: str | os.PathLike | None = None,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    timeout_s: float = 1800.0,
    loader: str = _DEFAULT_LOADER,
    runtime: str = "inductor",
) -> Remeasured:
    """Re-time saved artifacts in one fresh Python process, interleaved, inside the machine lock.

    Args:
        paths: ``model.pt2`` files (e.g. ``trials/NNNN/model.pt2``).
        example_input: the task's example input (batch 1 is timed).
        rounds, runs, warmup, threads: as :func:`time_interleaved` (10 x 10 calls by default:
            100 per model, more than the gate's 60).
        lock_dir: the machine lock's folder (default as :class:`MachineLock`).
        resamples, confidence, seed: the median's bootstrap interval.
        timeout_s: the process is killed after this long.
        loader: ``"module:function"`` that turns a path into a compiled callable (the runtime's
            loader; default :func:`autoshrink.export.load_deployable`, what the search timed).
        runtime: another deployment runtime than Inductor (``"onnxruntime"``, ``"openvino"``):
            each path's folder holds that runtime's artifact, timed on a float32 array in a
            ``python -I`` process that imports only that runtime and numpy
            (:mod:`autoshrink.measure.fresh`, the settings the search timed; ``loader`` is then
            not used).

    Returns:
        A :class:`Remeasured`; an artifact that cannot be loaded is listed in ``errors``.

    Raises:
        RemeasureError: the process failed or ran past ``timeout_s``.
        ValueError: no paths.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("remeasure needs at least one model.pt2 path, got none")
    if runtime != "inductor":
        return _remeasure_runtime(paths, example_input, runtime=runtime, rounds=rounds, runs=runs, warmup=warmup,
                                  threads=threads, lock_dir=lock_dir, resamples=resamples, confidence=confidence,
                                  seed=seed, timeout_s=timeout_s)
    with tempfile.TemporaryDirectory(prefix="autoshrink-remeasure-") as tmp:
        inp, out = Path(tmp) / "input.pt", Path(tmp) / "result.json"
        torch.save(example_input[:1].detach().cpu().contiguous().clone(), inp)
        cmd = [
            sys.executable, "-m", "autoshrink.measure.remeasure", "--input", str(inp), "--out", str(out),
            "--rounds", str(rounds), "--runs", str(runs), "--warmup", str(warmup), "--threads", str(threads),
            "--resamples", str(resamples), "--confidence", str(confidence), "--seed", str(seed),
            "--loader", loader,
        ]
        if lock_dir is not None:
            cmd += ["--lock-dir", str(lock_dir)]
        cmd += ["--", *paths]
        env = dict(os.environ)
        # the child imports this very autoshrink, also when it is not installed (a checkout)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        data = _run_child(cmd, out, f"{len(paths)} artifact(s)", timeout_s, env)
    return Remeasured(
        spreads={r["path"]: Spread(**r["spread"]) for r in data["results"] if "spread" in r},
        errors={r["path"]: r["error"] for r in data["results"] if "error" in r},
        load=data.get("load", {}),
        warning=data.get("warning"),
        host=data.get("host", ""),
    )


def _run_child(cmd: list[str], out: Path, what: str, timeout_s: float, env: dict | None = None) -> dict:
    """Run a re-timing process; its JSON result, or a :class:`RemeasureError` with its last output."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RemeasureError(
            f"re-timing {what} ran past {timeout_s:g} s and was stopped; raise timeout_s or re-time fewer finalists"
        ) from exc
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
        raise RemeasureError(f"the re-timing process exited with {proc.returncode}:\n" + "\n".join(tail))
    return json.loads(out.read_text())


def _remeasure_runtime(paths: list[str], example_input: torch.Tensor, *, runtime: str, rounds: int, runs: int,
                       warmup: int, threads: int, lock_dir, resamples: int, confidence: float, seed: int,
                       timeout_s: float) -> Remeasured:
    """:func:`remeasure` of ONNX Runtime / OpenVINO artifacts (in each path's folder), in an
    isolated interpreter that imports only the runtime and numpy (:mod:`autoshrink.measure.fresh`)."""
    if runtime not in fresh.ARTIFACTS:
        raise ValueError(f"runtime {runtime!r}: expected inductor or one of {sorted(fresh.ARTIFACTS)}")
    folders = {p: str(Path(p).parent) for p in paths}
    with tempfile.TemporaryDirectory(prefix="autoshrink-remeasure-") as tmp:
        inp, out = Path(tmp) / "input.npy", Path(tmp) / "result.json"
        np.save(inp, example_input[:1].detach().cpu().float().contiguous().numpy())
        cmd = [sys.executable, "-I", fresh.__file__, "--runtime", runtime, "--input", str(inp), "--out", str(out),
               "--rounds", str(rounds), "--runs", str(runs), "--warmup", str(warmup), "--threads", str(threads),
               "--window-s", str(WINDOW_S)]
        if lock_dir is not None:  # else the child's MachineLock reads $AUTOSHRINK_LOCK_DIR (-I keeps it)
            cmd += ["--lock-dir", str(lock_dir)]
        data = _run_child([*cmd, "--", *folders.values()], out, f"{len(paths)} {runtime} artifact(s)", timeout_s)
    by_folder = {r["folder"]: r for r in data["results"]}
    spreads, errors = {}, {}
    for path, folder in folders.items():
        r = by_folder[folder]
        if "times_ms" in r:
            spreads[path] = spread(r["times_ms"], threads=threads, resamples=resamples, confidence=confidence,
                                   seed=seed)
        else:
            errors[path] = r.get("error", "no timing returned")

    def loadavg() -> tuple[float, float, float]:
        if not data.get("loadavg"):
            raise OSError("no load average")
        return tuple(data["loadavg"])

    def busy() -> float | None:  # the child's window, read as busy_cores reads its own
        window = data.get("cpu_window")
        if not window:
            return None
        stats = iter(window["stat"])
        return busy_cores(read=lambda: next(stats), sleep=lambda _s: None,
                          cpus=set(window["cpus"]) if window.get("cpus") else None)

    load = sample_load(loadavg, busy=busy)
    warning = load_warning(load)
    if data.get("imported"):  # e.g. a sitecustomize: the figure is then not the runtime's alone
        warning = "; ".join(w for w in (warning, f"the {runtime} timing process imported "
                                        f"{' and '.join(data['imported'])}") if w)
    return Remeasured(spreads=spreads, errors=errors, load=load, warning=warning, host=data.get("host", ""))


def remeasure_programs(
    programs: Mapping[str, bytes], example_input: torch.Tensor, **kwargs
) -> Remeasured:
    """:func:`remeasure` for artifacts sent as bytes (``model.pt2`` contents), keyed by name.

    For a machine that does not share the run folder, e.g. the latency-target node of a Ray
    cluster: its :class:`~autoshrink.measure.latency.LatencyMeter` actor receives the bytes and
    calls this there, so the fresh process runs on the target. Keyword arguments go to
    :func:`remeasure`; the result's keys are the names given.
    """
    with tempfile.TemporaryDirectory(prefix="autoshrink-programs-") as tmp:
        names = {}
        for i, (name, data) in enumerate(programs.items()):
            path = Path(tmp) / f"{i:04d}" / "model.pt2"
            path.parent.mkdir()
            # model.pt2 bytes, or {file name: bytes} of another runtime's artifact (model.xml + .bin)
            for file, content in (data.items() if isinstance(data, Mapping) else [("model.pt2", data)]):
                (path.parent / file).write_bytes(content)
            names[str(path)] = name
        got = remeasure(list(names), example_input, **kwargs)
    return Remeasured(
        spreads={names[k]: v for k, v in got.spreads.items()},
        errors={names[k]: v for k, v in got.errors.items()},
        load=got.load, warning=got.warning, host=got.host,
    )


class TrialRetimer:
    """The ``measure`` of :func:`autoshrink.finalists.rechoose`: trial numbers -> deployed figures.

    Each call re-times the trials' artifacts in one fresh process (here, or on the latency target
    through a :class:`~autoshrink.measure.latency.LatencyMeter` actor) and returns, per trial,
    :meth:`Spread.columns` or why it could not be timed. Load samples and noisy-machine warnings
    of every call are kept in ``loads`` / ``warnings`` for the run's record.

    Args:
        artifact: trial number -> its ``model.pt2`` (e.g. ``out / "trials" / f"{n:04d}" / "model.pt2"``).
        example_input: the task's example input.
        meter: a Ray actor handle of :class:`LatencyMeter` on the latency target, or None (local).
        runtime: the deployment runtime the trials were timed in; its artifact beside each
            ``model.pt2`` (``model.onnx``, ``model.xml``/``.bin``) is what is re-timed.
        **kwargs: :func:`remeasure`'s options (rounds, runs, warmup, threads, lock_dir, ...).

    Example:
        >>> retime = TrialRetimer(lambda n: Path(f"runs/demo/trials/{n:04d}/model.pt2"), x)  # doctest: +SKIP
        >>> chosen = rechoose(trials, budget.constraints(), retime).chosen                  # doctest: +SKIP
    """

    def __init__(
        self,
        artifact: Callable[[int], str | os.PathLike],
        example_input: torch.Tensor,
        *,
        meter=None,
        runtime: str = "inductor",
        **kwargs,
    ) -> None:
        self.artifact = artifact
        self.example_input = example_input
        self.meter = meter
        self.runtime = runtime
        self.files = _artifact_files(runtime)
        self.kwargs = dict(kwargs, runtime=runtime)
        self.loads: list[dict] = []
        self.warnings: list[str] = []

    def __call__(self, numbers: Sequence[int]) -> dict[int, dict[str, float] | str]:
        paths = {int(n): Path(self.artifact(int(n))) for n in numbers}
        out: dict[int, dict[str, float] | str] = {}
        for n, p in paths.items():
            # Inductor's is the path itself; another runtime's files lie beside it
            missing = [p] if self.runtime == "inductor" else [p.parent / f for f in self.files]
            missing = [m for m in missing if not m.is_file()]
            if missing:
                out[n] = f"no artifact at {missing[0]} (not saved, or deleted)"
        todo = {n: p for n, p in paths.items() if n not in out}
        if not todo:
            return out
        if self.meter is None:
            got = remeasure(list(todo.values()), self.example_input, **self.kwargs)
            key = {n: str(p) for n, p in todo.items()}
        else:
            import ray

            programs = {str(n): p.read_bytes() if self.runtime == "inductor"
                        else {f: (p.parent / f).read_bytes() for f in self.files} for n, p in todo.items()}
            got = ray.get(self.meter.remeasure.remote(programs, self.example_input, **self.kwargs))
            key = {n: str(n) for n in todo}
        self.loads.append(got.load)
        if got.warning and got.warning not in self.warnings:
            self.warnings.append(got.warning)
        for n, k in key.items():
            if k in got.spreads:
                out[n] = got.spreads[k].columns()
            else:
                out[n] = got.errors.get(k, "no timing returned")
        return out


# --------------------------------------------------------------------------------------------
# the fresh process: child side
# --------------------------------------------------------------------------------------------


def _artifact_files(runtime: str) -> tuple[str, ...]:
    """The files a trial's artifact is made of in ``runtime`` (beside it, ``model.pt2``)."""
    from autoshrink.runtimes import get as get_runtime

    if runtime == "inductor":
        return ("model.pt2",)
    main = get_runtime(runtime).artifact
    return (main, "model.bin") if main.endswith(".xml") else (main,)


def _load_callable(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--loader must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the re-timing process (see :func:`remeasure`); writes JSON to ``--out``."""
    p = argparse.ArgumentParser(prog="python -m autoshrink.measure.remeasure", description=__doc__.splitlines()[0])
    fresh.add_timing_arguments(p, "torch.save'd example input")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loader", default=_DEFAULT_LOADER)
    p.add_argument("paths", nargs="+")
    args = p.parse_args(argv)

    from autoshrink import _env
    from autoshrink._files import atomic_path

    _env.configure()
    x = torch.load(args.input, weights_only=True)
    load = _load_callable(args.loader)
    lock = MachineLock(args.lock_dir)
    results: list[dict] = [{"path": path} for path in args.paths]
    models, timed = [], []
    for entry in results:
        try:
            fn = load(entry["path"])
            # the first call compiles: done here, one artifact at a time, so that one that does not
            # compile is listed with its reason while the others are timed
            with lock.training(), fixed_threads(args.threads), torch.inference_mode():
                fn(x[:1].contiguous())
        except Exception as exc:  # noqa: BLE001  (a loader's or Inductor's many error types)
            entry["error"] = fresh.error_line(exc)
            continue
        models.append(fn)
        timed.append(entry)
    sample = sample_load()
    if models:
        times = time_interleaved(
            models, x, rounds=args.rounds, runs=args.runs, warmup=args.warmup, threads=args.threads, lock=lock,
        )
        for entry, t in zip(timed, times, strict=True):
            entry["spread"] = asdict(spread(t, threads=args.threads, resamples=args.resamples,
                                            confidence=args.confidence, seed=args.seed))
            entry["times_ms"] = t.tolist()
    payload = {"results": results, "load": sample, "warning": load_warning(sample),
               "host": socket.gethostname(), "rounds": args.rounds, "runs": args.runs}
    with atomic_path(Path(args.out)) as tmp:
        Path(tmp).write_text(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())

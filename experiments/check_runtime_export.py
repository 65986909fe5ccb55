"""Done-when check of a search in ONNX Runtime / OpenVINO: ``best/`` runs in that runtime alone as recorded.

Given a run folder made by ``autoshrink search --runtime onnxruntime|openvino --out D``, this
loads ``D/best/model.onnx`` (resp. ``model.xml``) in a FRESH Python process (``python -I``) that
imports only the runtime and numpy (it checks ``sys.modules`` for torch and autoshrink and fails
if either got in), opened with the settings of ``autoshrink/measure/fresh.py`` (loaded by its path,
not imported as part of autoshrink: the same file the search's re-timing runs as its script),
times it the way the search's gate does (:func:`autoshrink.runtimes.time_runtime`
-> :func:`autoshrink.measure.latency.measure_latency`: batch 1, the recorded thread count, one untimed
call, 10 warm-up calls, the median and quartiles of ``--runs`` timed calls of a prepared float32
array, inside the machine lock's exclusive side), and scores the validation set in batches of 256
(the last padded to 256 and the pad dropped, as ``Task.evaluate(fixed_batch=True)`` does). Then it
checks, against ``D/best/metrics.json`` (what the search recorded for the chosen trial):

- the runtime and its version, and the thread count, are the ones recorded;
- the median lands inside the spread recorded for the shipped artifact: its re-timing as shipped
  (``latency_deployed_p25_ms``-``latency_deployed_p75_ms``, 100 calls in a fresh process) when the
  run has one, else the gate's (``latency_ms`` +- ``latency_iqr_ms``: the gate keeps the IQR's width,
  not its ends); ``--slack F`` widens the band by F x the recorded median and ``--slack-ms M``
  by M milliseconds (default 0: none; a model timed in tens of microseconds moves by about that
  much between two processes, from the per-call cost of Python and the runtime alone);
  ``--tries N`` (default 1) re-times in a new fresh process, up to N times in all, while this is
  the only check that fails: interference from other processes only ever adds time, so one try
  inside the band shows that the recorded figure is reproducible, where a 2-core machine shared
  with other jobs has moved one sub-millisecond median past the band (every try's median is shown);
- the median meets the latency budget;
- the predictions give the recorded int8 accuracy (``accuracy``, on the validation split), to
  within one sample (a tie between two logits may round either way).

The validation data: ``--val-npz FILE`` (arrays ``x``, float32 NCHW, and ``y``) is used as is, with
no autoshrink anywhere; otherwise the parent process builds the built-in task's validation split
with autoshrink, for the data only (``autoshrink.tasks.digits.digits_data()``: no teacher is loaded
or trained) and hands it to the fresh process as such a file.

Exit status 0 when every check passes, 1 when one fails, 2 for an unusable run folder.

Usage:
    python experiments/check_runtime_export.py D [--runs 60] [--slack 0] [--slack-ms 0] [--tries 1] [--val-npz val.npz]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARTIFACT = {"onnxruntime": "model.onnx", "openvino": "model.xml"}
FRESH = Path(__file__).resolve().parents[1] / "autoshrink" / "measure" / "fresh.py"
BAND_CHECK = "median inside the recorded spread"
EVAL_BATCH = 256  # Task.evaluate's batch size, the last batch padded to it (fixed_batch=True)


# ----------------------------------------------------------------------------------------------
# the fresh process: the runtime and numpy, nothing else
# ----------------------------------------------------------------------------------------------


def _fresh_module():
    """``autoshrink/measure/fresh.py`` loaded by its path: the runtimes' settings and the machine
    lock from the one file the search takes them from, without importing autoshrink (or torch)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("autoshrink_fresh", FRESH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child(runtime: str, folder: str, val: str, runs: int, warmup: int, threads: int, lock_dir: str) -> dict:
    import numpy as np

    fresh = _fresh_module()
    data = np.load(val)
    x_val, y_val = data["x"].astype(np.float32), data["y"]
    run, version = fresh.open_artifact(runtime, folder, threads)  # as the search timed it, as best/README.md says
    x1 = np.ascontiguousarray(x_val[:1])
    lock = fresh.MachineLock(lock_dir)
    with lock.training():  # the first call as the gate makes it: under the shared side
        run(x1)
    with lock.measuring():
        for _ in range(warmup):
            run(x1)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run(x1)
            times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    correct = 0
    for i in range(0, len(x_val), EVAL_BATCH):
        xb, yb = x_val[i:i + EVAL_BATCH], y_val[i:i + EVAL_BATCH]
        n = len(xb)
        if n < EVAL_BATCH:
            xb = np.concatenate([xb, np.zeros((EVAL_BATCH - n, *xb.shape[1:]), np.float32)])
        logits = np.asarray(run(np.ascontiguousarray(xb)))[:n]
        correct += int((logits.argmax(-1) == yb).sum())
    return {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2], "runs": runs,
            "accuracy": 100.0 * correct / len(y_val), "n_val": int(len(y_val)), "version": version,
            "threads": threads, "torch_imported": "torch" in sys.modules,
            "autoshrink_imported": "autoshrink" in sys.modules}


# ----------------------------------------------------------------------------------------------
# the parent: reads the record, prepares the data, runs the fresh process, judges
# ----------------------------------------------------------------------------------------------


def _validation_npz(task: str, dest: Path) -> Path:
    """The built-in task's validation split as ``x``/``y`` arrays (autoshrink used for the data only)."""
    import numpy as np

    if task.startswith("digits"):
        from autoshrink.tasks.digits import digits_data  # the split alone: no teacher loaded or trained

        x, y = digits_data().val.tensors
    else:  # another built-in task: its Task (which may load its teacher) for its validation data
        import autoshrink as ash

        x, y = ash.tasks.get(task, progress=False).val_data.tensors
    np.savez(dest, x=x.numpy().astype(np.float32), y=y.numpy())
    return dest


def fresh_run(runtime: str, folder: Path, val_npz: Path, *, runs: int, warmup: int, threads: int,
              lock_dir: str | None = None, timeout_s: float = 600.0) -> dict:
    """Time and score ``folder``'s artifact in a fresh ``python -I`` process with ``runtime`` alone."""
    lock_dir = lock_dir or os.environ.get("AUTOSHRINK_LOCK_DIR") or tempfile.gettempdir()
    cmd = [sys.executable, "-I", str(Path(__file__).resolve()), "--child", runtime, str(folder), str(val_npz),
           str(runs), str(warmup), str(threads), str(lock_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the fresh {runtime} process exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def recorded_spread(trial: dict) -> tuple[float, float, float, str]:
    """(median, low, high, what) of the spread recorded for the chosen trial's shipped artifact."""
    dep, lo, hi = (trial.get(k) for k in ("latency_ms_deployed", "latency_deployed_p25_ms", "latency_deployed_p75_ms"))
    if dep is not None and lo is not None and hi is not None:
        return float(dep), float(lo), float(hi), "re-timed as shipped: p25-p75"
    med, iqr = trial.get("latency_ms"), trial.get("latency_iqr_ms")
    if med is None:
        raise ValueError("metrics.json records no latency for the chosen trial (was it timed? latency_runs=0?)")
    iqr = float(iqr or 0.0)
    return float(med), float(med) - iqr, float(med) + iqr, "gate: median +- IQR width"


def judge(metrics: dict, fresh: dict, runtime: str, *, slack: float = 0.0,
          slack_ms: float = 0.0) -> list[tuple[str, str, str, bool]]:
    """The checks: (what, recorded, this process, passed) rows."""
    trial = metrics["trial"]
    rows = [
        ("fresh process: no torch / autoshrink", "-",
         f"torch={fresh['torch_imported']} autoshrink={fresh['autoshrink_imported']}",
         not fresh["torch_imported"] and not fresh["autoshrink_imported"]),
        ("runtime, version", f"{trial.get('runtime')} {trial.get('runtime_version')}", f"{runtime} {fresh['version']}",
         trial.get("runtime") == runtime and str(trial.get("runtime_version")) == fresh["version"]),
        ("threads", str(trial.get("latency_threads")), str(fresh["threads"]),
         int(trial.get("latency_threads") or 1) == fresh["threads"]),
    ]
    med, lo, hi, what = recorded_spread(trial)
    lo_s, hi_s = lo - slack * med - slack_ms, hi + slack * med + slack_ms
    widened = (f", +-{slack:g}x median" if slack else "") + (f", +-{slack_ms:g} ms" if slack_ms else "")
    band = f"{lo_s:.3f}-{hi_s:.3f} ms ({what}{widened}; median {med:.3f})"
    m = fresh["median_ms"]
    rows.append((BAND_CHECK, band,
                 f"{m:.3f} ms (IQR {fresh['p25_ms']:.3f}-{fresh['p75_ms']:.3f}, {fresh['runs']} runs)",
                 lo_s <= m <= hi_s))
    if trial.get("latency_ms_deployed") is not None and what.startswith("re-timed"):
        gate, giqr = trial.get("latency_ms"), trial.get("latency_iqr_ms")
        if gate is not None:  # information: the gate's figure (taken before the fine-tune, on another graph)
            rows.append(("(info) gate figure", f"{float(gate):.3f} ms +- {float(giqr or 0):.3f}", f"{m:.3f} ms", True))
    budget = (metrics.get("budget") or {}).get("latency_ms")
    if budget is not None:
        rows.append(("meets the latency budget", f"<= {float(budget):g} ms", f"{m:.3f} ms", m <= float(budget)))
    acc = trial.get("accuracy")
    tol = 100.0 / fresh["n_val"] + 1e-9
    rows.append(("int8 accuracy on the validation split",
                 "-" if acc is None else f"{float(acc):.2f} % (+- one sample: {tol:.2f})",
                 f"{fresh['accuracy']:.2f} % of {fresh['n_val']}",
                 acc is not None and abs(fresh["accuracy"] - float(acc)) <= tol))
    return rows


def print_table(rows: list[tuple[str, str, str, bool]]) -> None:
    header = ("check", "recorded", "this process", "verdict")
    body = [(a, b, c, "PASS" if ok else "FAIL") for a, b, c, ok in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]
    for r in [header, tuple("-" * w for w in widths), *body]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        runtime, folder, val, runs, warmup, threads, lock_dir = argv[1:8]
        print(json.dumps(_child(runtime, folder, val, int(runs), int(warmup), int(threads), lock_dir)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder of autoshrink search --runtime onnxruntime|openvino")
    p.add_argument("--task", default="digits", help="the built-in task the run searched (default digits)")
    p.add_argument("--val-npz", help="validation data as arrays x, y (then autoshrink is not imported at all)")
    p.add_argument("--runs", type=int, default=60, help="timed calls (the search's default: 60)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up calls (the search's: 10)")
    p.add_argument("--slack", type=float, default=0.0,
                   help="widen the recorded spread by this fraction of its median (default 0)")
    p.add_argument("--slack-ms", type=float, default=0.0,
                   help="widen the recorded spread by this many milliseconds (default 0)")
    p.add_argument("--tries", type=int, default=1,
                   help="re-time up to this many times in all while only the spread check fails (default 1)")
    p.add_argument("--json", help="also write the figures and verdicts to this file")
    args = p.parse_args(argv)

    best = Path(args.run) / "best"
    metrics_file = best / "metrics.json"
    if not metrics_file.is_file():
        print(f"{metrics_file}: not found (no trial met the budget, or not a run folder)", file=sys.stderr)
        return 2
    metrics = json.loads(metrics_file.read_text())
    runtime = metrics["trial"].get("runtime")
    if runtime not in ARTIFACT:
        print(f"{metrics_file}: the run was timed in {runtime!r}; this checks onnxruntime or openvino runs "
              "(experiments/time_exported.py re-times an Inductor model.pt2)", file=sys.stderr)
        return 2
    if not (best / ARTIFACT[runtime]).is_file():
        print(f"{best / ARTIFACT[runtime]}: missing; a {runtime} run ships it in best/", file=sys.stderr)
        return 2
    threads = int(metrics["trial"].get("latency_threads") or 1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="check-runtime-export-") as tmp:
        val = Path(args.val_npz) if args.val_npz else _validation_npz(args.task, Path(tmp) / "val.npz")
        medians = []
        for attempt in range(max(1, args.tries)):
            fresh = fresh_run(runtime, best, val, runs=args.runs, warmup=args.warmup, threads=threads)
            rows = judge(metrics, fresh, runtime, slack=args.slack, slack_ms=args.slack_ms)
            medians.append(fresh["median_ms"])
            failed = {r[0] for r in rows if not r[3]}
            if failed != {BAND_CHECK} or attempt + 1 >= args.tries:
                break
            time.sleep(2.0)
    load_after = os.getloadavg()
    print(f"{best}: {runtime} {fresh['version']}, {threads} thread(s), batch 1; "
          f"data: {args.val_npz or f'{args.task} validation split (built with autoshrink, data only)'}")
    print_table(rows)
    if len(medians) > 1:
        print(f"{len(medians)} tries (only the spread check failed before the last): medians "
              + ", ".join(f"{m:.3f}" for m in medians) + " ms")
    cores = os.cpu_count() or 1
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after, on {cores} cores"
          + ("; other processes share the CPU, so latency figures are noisy" if load_after[0] > cores - 1 else ""))
    ok = all(r[3] for r in rows)
    print("PASS" if ok else "FAIL")
    if args.json:
        Path(args.json).write_text(json.dumps({"fresh": fresh, "checks": [
            {"check": a, "recorded": b, "fresh": c, "pass": d} for a, b, c, d in rows], "pass": ok,
            "load": [load_before[0], load_after[0]], "tries_median_ms": medians}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

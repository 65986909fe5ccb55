"""How much does a latency figure move on a busy machine? The gate timing vs the interleaved re-timing.

One model (default: the digits ResNet-18, uniform int8, lowered and compiled with the search's
own path) is timed K times, alternately in two ways, while a background process loads the
machine like a search does (another tenant: it does *not* take autoshrink's machine lock, which
only keeps autoshrink's own trials apart):

- **gate**: what each trial records today, :func:`autoshrink.measure.latency.measure_latency`,
  one 60-run median at a time, in this process;
- **re-timed**: :func:`autoshrink.measure.remeasure.remeasure` on the saved ``model.pt2``, in a
  fresh process each time, 10 rounds x 10 runs, with its bootstrap interval of the median.

It prints every figure, then per method the spread of the K medians (min, median, max, and
(max - min) / median), and how many re-timing intervals contain the median of all re-timings.

Background loads (``--load``): ``matmul`` (a 1-thread matrix-product loop), ``finetune`` (a
1-thread training loop of a small CNN, like a trial's fine-tune), ``none``. ``--burst ON,OFF``
switches the load on for ON seconds and off for OFF seconds (a search's load comes and goes).
On a machine with more than one core the load is pinned to the last core.

Usage:
    python experiments/bench_noise.py --k 5 --load finetune --burst 2,1
    python experiments/bench_noise.py --model resnet20 --k 8 --load matmul
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path


def _background(kind: str, burst: tuple[float, float] | None, stop) -> None:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    cores = os.cpu_count() or 1
    if cores > 1 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cores - 1})
    torch.set_num_threads(1)
    if kind == "matmul":
        a, b = torch.randn(384, 384), torch.randn(384, 384)

        def step() -> None:
            a @ b
    else:
        net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                            nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(32, 1, 32, 32), torch.randint(0, 10, (32,))

        def step() -> None:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    start = time.monotonic()
    while not stop.is_set():
        if burst is not None:
            on, off = burst
            phase = (time.monotonic() - start) % (on + off)
            if phase >= on:
                time.sleep(min(on + off - phase, 0.05))
                continue
        step()


def _model(name: str, example):
    """The lowered (PTQ int8) zoo model, as a trial's gate builds it."""
    import torch

    from autoshrink import Candidate, models
    from autoshrink.compress.quantize import lower, prepare_ptq

    torch.manual_seed(0)
    # latency depends on the lowered graph, not on the weights' values (see trial.py), so an
    # untrained model of the architecture stands for the trained one
    model = models.create(name, num_classes=10, in_chans=1).eval()
    calib = [torch.randn(32, *example.shape[1:]) for _ in range(4)]
    return lower(prepare_ptq(model, Candidate.uniform(bits=8), example, calib))


def _summary(label: str, medians: list[float]) -> str:
    lo, mid, hi = min(medians), statistics.median(medians), max(medians)
    return (f"{label:>9}: K={len(medians)} medians {lo:.3f} / {mid:.3f} / {hi:.3f} ms (min / median / max), "
            f"spread (max - min) / median = {(hi - lo) / mid:.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18_32", help="a zoo model (autoshrink.models.list_models())")
    p.add_argument("--k", type=int, default=5, help="timings per method")
    p.add_argument("--load", choices=("finetune", "matmul", "none"), default="finetune")
    p.add_argument("--burst", default=None, help="ON,OFF seconds of background load (default: always on)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()

    from autoshrink import _env

    _env.configure()
    import torch

    from autoshrink.compress.quantize import compile_cpu
    from autoshrink.measure.latency import MachineLock, measure_latency
    from autoshrink.measure.load import load_warning, sample_load
    from autoshrink.measure.remeasure import remeasure
    from autoshrink.trial import save_deployable

    x = torch.randn(1, 1, 32, 32)
    lowered = _model(args.model, x)
    tmp = Path(tempfile.mkdtemp(prefix="bench-noise-"))
    path = save_deployable(lowered, x, tmp / "model.pt2")
    gate_model = compile_cpu(lowered)
    lock = MachineLock()
    measure_latency(gate_model, x, runs=5, threads=args.threads, lock=lock)  # compile outside the loop

    ctx = mp.get_context("spawn")  # a fresh interpreter: no compiled graphs or threads of ours
    stop = ctx.Event()
    burst = tuple(float(v) for v in args.burst.split(",")) if args.burst else None
    bg = None
    if args.load != "none":
        bg = ctx.Process(target=_background, args=(args.load, burst, stop), daemon=True)
        bg.start()
        time.sleep(2.0)  # let it start
    print(f"model {args.model} uniform int8, batch 1, {args.threads} thread(s); background load: {args.load}"
          f"{f' (bursts {burst[0]:g} s on, {burst[1]:g} s off)' if burst else ''}; {os.cpu_count()} cores")
    sample = sample_load()
    print(f"load before: {sample['load_1m']:.2f} (1 min) on {sample['cores']} cores"
          + (f" — {load_warning(sample)}" if load_warning(sample) else ""))
    gate, retimed, intervals = [], [], []
    try:
        for i in range(args.k):
            lat = measure_latency(gate_model, x, runs=60, warmup=10, threads=args.threads, lock=lock)
            gate.append(lat.median_ms)
            out = remeasure([path], x, rounds=args.rounds, runs=args.runs, threads=args.threads)
            s = out.spreads[str(path)]
            retimed.append(s.median_ms)
            intervals.append(s.interval)
            print(f"[{i + 1}/{args.k}] gate {lat.median_ms:.3f} ms (IQR {lat.p25_ms:.3f}-{lat.p75_ms:.3f}) | "
                  f"re-timed {s.median_ms:.3f} ms (IQR {s.p25_ms:.3f}-{s.p75_ms:.3f}, p90 {s.p90_ms:.3f}, "
                  f"95 % CI {s.ci_low_ms:.3f}-{s.ci_high_ms:.3f}) | load {out.load.get('load_1m', float('nan')):.2f}")
    finally:
        stop.set()
        if bg is not None:
            bg.join(timeout=10)
            if bg.is_alive():
                bg.terminate()
    print(_summary("gate", gate))
    print(_summary("re-timed", retimed))
    centre = statistics.median(retimed)
    covered = sum(lo <= centre <= hi for lo, hi in intervals)
    print(f"re-timing intervals containing the median of all re-timings ({centre:.3f} ms): {covered}/{len(intervals)}")
    print(f"gate vs re-timed (medians of K): {statistics.median(gate):.3f} vs {centre:.3f} ms "
          f"({centre / statistics.median(gate) - 1:+.1%}; the artifact here is the PTQ graph itself, so the "
          "difference is the process and the timing scheme, not the graph)")


if __name__ == "__main__":
    main()

"""What the search machinery costs, and what a second worker buys.

1. **Overhead** of a small search: ``1 - Σ(trial work) / (workers × span)``, where trial work is
   each trial's compress + measure + fine-tune + evaluate seconds and span runs from the first
   trial's start to the last trial's end (Ray scheduling, Optuna ask/tell, data shipping, process
   start, and waiting for the latency lock all count as overhead).
2. **Speed-up** of 2 workers over 1 on training-bound trials: the same candidates (uniform int8,
   several pruning ratios, a long fine-tune, no budget so every one is fine-tuned) through
   ``ash.sweep`` with ``workers=1`` then ``workers=2``, one torch thread per worker. Latency timing
   holds the machine lock (nobody trains meanwhile), so it is the serial part; with few trials,
   so is the last one running alone, which ``sweep`` shortens by starting the longest first.
3. **Latency predictor** (``--predictor N``): N candidates sampled from the space; the per-layer
   lookup table's prediction (raw sum) vs the latency measured as a trial measures it, and the
   calibrated prediction (:mod:`autoshrink.measure.calibration`) held out: fitted on half of the N
   and scored on the other half, and k-fold; median relative error and Kendall τ, with the
   machine key. Every measurement is also recorded as a calibration example of this machine, and
   the stored calibration is refitted on all of them (a search screens with it where it meets
   its goal). ``--repeat`` measures every candidate a second time (again as a trial does: a fresh
   lowering, compile and timing) and prints the **noise ceiling**: Kendall τ and the median relative
   difference between the two measurements of the same candidates. No predictor can rank held-out
   candidates better than the measurements rank themselves, so τ ≥ 0.9 is only a fair goal where
   the ceiling is above it.

Usage:
    python experiments/bench_overhead.py --task tiny --trials 6 --workers 2 --speedup 4 --predictor 15
    python experiments/bench_overhead.py --task digits --untrained --trials 0 --speedup 0 --predictor 16 --repeat
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import autoshrink as ash
from autoshrink.record import STUDY_DIRECTIONS

WORK = ("compress_s", "measure_s", "finetune_s", "evaluate_s")


def span_and_work(out: str | os.PathLike) -> tuple[float, float, int]:
    """(span from the first trial's start to the last trial's end, Σ trial work, trials)."""
    study = ash.load(out)._study
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    if not trials:
        return float("nan"), 0.0, 0
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    work = sum(float(t.user_attrs.get(k) or 0.0) for t in trials for k in WORK)
    return (last - first).total_seconds(), work, len(trials)


def overhead(task, space, budget, trials: int, workers: int, out: Path) -> None:
    start = time.perf_counter()
    ash.search(task, space, budget, trials=trials, workers=workers, out=out, seed=0, progress=False)
    wall = time.perf_counter() - start
    span, work, n = span_and_work(out)
    print(f"[overhead] {n} trials, {workers} worker(s): span {span:.1f} s, trial work {work:.1f} s, "
          f"overhead fraction {1 - work / (workers * span):.1%}; whole call {wall:.1f} s "
          f"(setup before the first trial and the report after the last: {wall - span:.1f} s)")


def speedup(task, n: int, steps: int, out: Path) -> None:
    ratios = [0.0, 0.25, 0.5, 0.125, 0.375, 0.625][:n]
    cands = [ash.Candidate.uniform(bits=8, prune=r, steps=steps, batch_size=32, round_to=4) for r in ratios]
    figures = {}
    for workers in (1, 2):
        start = time.perf_counter()
        ash.sweep(task, cands, None, workers=workers, threads_per_worker=1, out=out / f"workers{workers}",
                  progress=False)
        wall = time.perf_counter() - start
        span, work, _ = span_and_work(out / f"workers{workers}")
        figures[workers] = (wall, span, work)
        print(f"[speed-up] {len(cands)} candidates, {steps} fine-tune steps, {workers} worker(s) x 1 thread: "
              f"span {span:.1f} s (whole call {wall:.1f} s), trial work {work:.1f} s", flush=True)
    (w1, s1, _), (w2, s2, _) = figures[1], figures[2]
    print(f"[speed-up] 2 workers over 1: {s1 / s2:.2f}x on the trials' span, {w1 / w2:.2f}x on the whole call")


def predictor(task, space, n: int, seed: int, repeat: bool = False) -> None:
    """N sampled candidates, each predicted by the table (raw sum) and measured as a trial measures
    it; every measurement is recorded as a calibration example of this machine. Then raw vs
    calibrated, held out: fitted on the first half and scored on the second, and k-fold over all."""
    import optuna
    from compare_search import measured_latency_ms

    from autoshrink.compress import compress
    from autoshrink.measure import calibration as cal
    from autoshrink.measure.predictor import LatencyPredictor

    sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(directions=STUDY_DIRECTIONS, sampler=sampler)
    pred = LatencyPredictor.for_machine()
    start = time.perf_counter()
    before = len(pred.table)
    rows, structures, again = [], [], []
    for _ in range(n):
        cand = space.sample(study.ask())
        t0 = time.perf_counter()
        comp = compress(task.model, cand, task.example_input)
        s = pred.structure(comp.pruned, comp.bits, task.example_input)
        p = pred.predict_structure(s, calibrated=False)
        t_pred = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = measured_latency_ms(task, cand)
        t_meas = time.perf_counter() - t0
        pred.record(s, m)
        rows.append((p, m, t_pred, t_meas))
        structures.append(s)
        second = ""
        if repeat:
            again.append(measured_latency_ms(task, cand))
            second = f", again {again[-1]:7.3f} ms"
        print(f"  raw {p:7.3f} ms  measured {m:7.3f} ms{second}  ({t_pred:5.1f} s vs {t_meas:5.1f} s)", flush=True)
    raw, measured = [r[0] for r in rows], [r[1] for r in rows]
    vectors = [cal.feature_vector(s, pred.table) for s in structures]
    print(f"[predictor] machine {pred.machine}; {n} candidates; table {before} -> {len(pred.table)} entries, "
          f"{time.perf_counter() - start:.0f} s in all; per candidate once the table is warm: "
          f"{statistics.median(r[2] for r in rows[n // 2:]):.2f} s to predict vs "
          f"{statistics.median(r[3] for r in rows):.1f} s to measure")
    if n >= 4:
        half = n // 2
        coef = cal.fit(vectors[:half], measured[:half])
        fitted = [sum(c * v for c, v in zip(coef, vec, strict=True)) for vec in vectors[half:]]
        tau, err = cal.score(fitted, measured[half:])
        raw_tau, raw_err = cal.score(raw[half:], measured[half:])
        print(f"[predictor] split (fit on {half}, held out {n - half}): raw sum tau {raw_tau:.2f}, median error "
              f"{raw_err:.1%}; calibrated tau {tau:.2f}, median error {err:.1%}")
        k = cal.held_out(vectors, measured, raw, folds=5)
        print(f"[predictor] {k['folds']}-fold over all {n}: raw sum tau {k['raw_tau']:.2f}, median error "
              f"{k['raw_median_error']:.1%}; calibrated tau {k['tau']:.2f}, median error {k['median_error']:.1%}")
    if repeat and n >= 2:
        ceil_tau, ceil_diff = cal.score(again, measured)
        raw_tau2, _ = cal.score(raw, [(a + b) / 2 for a, b in zip(measured, again, strict=True)])
        print(f"[predictor] noise ceiling (each of the {n} measured twice, as a trial measures it): "
              f"tau {ceil_tau:.2f} between the two measurements, median difference {ceil_diff:.1%}; "
              f"raw sum tau {raw_tau2:.2f} against their mean")
    stored = pred.calibrate()
    if stored is not None:
        print(f"[predictor] stored calibration of this machine ({stored.n} recorded examples, this run's and "
              f"earlier ones): held-out tau {stored.tau:.2f}, median error {stored.median_error:.1%} "
              f"(raw sum: {stored.raw_tau:.2f}, {stored.raw_median_error:.1%}); goal tau >= {cal.GOAL_TAU} and "
              f"error <= {cal.GOAL_MEDIAN_ERROR:.0%}: {'met' if stored.meets_goal else 'not met'}; coefficients "
              + ", ".join(f"{f} {c:.3g}" for f, c in zip(cal.FEATURES, stored.coef, strict=True)))


def untrained_task(name: str) -> tuple[ash.Task, ash.SearchSpace]:
    """A built-in digits task with its architecture untrained (the digits data, seeded weights):
    what the latency predictor is checked on needs no teacher, since a structured pruning ratio
    keeps the same channel counts whatever the weights, and int8 kernels run as fast on any values."""
    from autoshrink.tasks import blueprint
    from autoshrink.tasks.digits import digits_data

    if name in ("tiny", "cifar10"):
        raise SystemExit(f"--untrained: needs a built-in digits task (digits, digits-resnet20, ...), not {name!r}")
    model, example = blueprint(name)
    data = digits_data()
    return (ash.Task(model=model, train_data=data.train, val_data=data.val, example_input=example,
                     name=f"{name}-untrained"), ash.SearchSpace.default())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="tiny", help="tiny (default), digits, digits-resnet20, ...")
    p.add_argument("--budget-ms", type=float, default=None, help="default: none (every trial fine-tuned)")
    p.add_argument("--trials", type=int, default=6, help="trials of the overhead search (0: skip)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--speedup", type=int, default=4, help="candidates of the speed-up sweeps (0: skip)")
    p.add_argument("--steps", type=int, default=300, help="fine-tune steps of the speed-up candidates")
    p.add_argument("--predictor", type=int, default=0, help="candidates to check the predictor on (0: skip)")
    p.add_argument("--repeat", action="store_true",
                   help="with --predictor: measure each candidate twice and print the noise ceiling")
    p.add_argument("--untrained", action="store_true",
                   help="a built-in digits task's architecture untrained (autoshrink.tasks.blueprint): the "
                        "figures here are timings, which depend on the layers' shapes, not on the weights, and "
                        "no teacher is trained (ResNet-18's takes ~13 min on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from compare_search import task_and_space

    task, space = untrained_task(args.task) if args.untrained else task_and_space(args.task)
    budget = ash.Budget(latency_ms=args.budget_ms)
    out = Path(args.out or time.strftime("runs/bench-overhead-%Y%m%d-%H%M%S"))
    print(f"task {args.task}; {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.1f}")
    if args.trials:
        overhead(task, space, budget, args.trials, args.workers, out / "search")
    if args.speedup:
        speedup(task, args.speedup, args.steps, out / "speedup")
    if args.predictor:
        predictor(task, space, args.predictor, args.seed, repeat=args.repeat)
    print(f"load average after: {os.getloadavg()[0]:.1f} (other processes share this machine if it is "
          f"above the workers in use)")


if __name__ == "__main__":
    main()

"""Where a search's time goes: per trial, seconds in compress / measure / fine-tune / evaluate,
and the remaining overhead (Ray scheduling, Optuna ask/tell, data shipping, process start).

Runs a search (default: the built-in digits task, 5 ms budget, 12 trials) or reads a finished
run folder, then prints a table and the whole search's overhead fraction:

    overhead = 1 - Σ(trial work) / (workers × wall time from the first trial's start to the last
    trial's end)

and separately the driver's setup before the first trial (teacher measurement, Ray start).

Usage:
    python experiments/bench_e2e.py --trials 12 --out runs/bench-e2e
    python experiments/bench_e2e.py --run runs/bench-e2e        # analyse an existing run
"""

from __future__ import annotations

import argparse
import time

import autoshrink as ash
from autoshrink.record import State, TrialAttr


def analyse(out: str, workers: int, started: float | None = None) -> None:

    result = ash.load(out)
    study = result._study
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    if not trials:
        print("no finished trials")
        return
    parts = ("compress_s", "measure_s", "finetune_s", "evaluate_s")
    print(f"{'trial':>5} {'state':>9} {'total':>8} " + " ".join(f"{p[:-2]:>9}" for p in parts)
          + f" {'overhead':>9}")
    work_sum = 0.0
    for t in trials:
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        work = [float(t.user_attrs.get(p) or 0.0) for p in parts]
        work_sum += sum(work)
        state = t.state.name if State.of(t) is not State.COMPLETE else (
            State.COMPLETE.value if t.user_attrs.get(TrialAttr.MEETS_BUDGET) else "INFEAS.")
        print(f"{t.number:>5} {state:>9} {wall:8.1f} " + " ".join(f"{w:9.1f}" for w in work)
              + f" {wall - sum(work):9.1f}")
    first = min(t.datetime_start for t in trials).timestamp()
    last = max(t.datetime_complete for t in trials).timestamp()
    span = last - first
    frac = 1 - work_sum / (workers * span) if span > 0 else float("nan")
    print(f"\nwall (first trial start -> last trial end): {span:.1f} s with {workers} worker(s)")
    print(f"trial work: {work_sum:.1f} s; overhead fraction: {frac:.1%}")
    if started is not None:
        print(f"driver setup before the first trial (teacher timing, Ray start, logits): "
              f"{first - started:.1f} s; whole command: {time.time() - started:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="analyse this finished run folder instead of running a search")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--budget-ms", type=float, default=5.0)
    p.add_argument("--task", default="digits")
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from autoshrink.search import default_workers

    workers = args.workers or default_workers()
    if args.run:
        analyse(args.run, workers)
        return
    task = ash.tasks.get(args.task)
    out = args.out or time.strftime("runs/bench-e2e-%Y%m%d-%H%M%S")
    started = time.time()
    ash.search(task, None, ash.Budget(latency_ms=args.budget_ms), trials=args.trials,
               workers=workers, out=out, seed=args.seed)
    analyse(out, workers, started)


if __name__ == "__main__":
    main()

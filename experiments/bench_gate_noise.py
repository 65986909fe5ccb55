"""Can single gate timings rank candidates? Where the gate's noise comes from, and what a longer
measurement would buy.

``bench_noise.py`` asks how far one model's figure moves under a search-like load; this asks
whether the budget gate's figures *rank* different candidates, which is what the latency
predictor is scored on (Kendall τ, ``bench_overhead.py --predictor``) and what decides which
candidates a search keeps. No predictor can rank better than the measurements rank themselves.

K candidates are sampled from the space (as ``bench_overhead.py --predictor`` samples them), each
compressed, PTQ-prepared, lowered and compiled C times with the trial's own path (int8, Inductor
with freezing, one thread). Then R interleaved rounds: each round times every compiled model for
one gate window (``--warmup`` untimed calls, then ``--runs`` timed calls, as
:func:`autoshrink.measure.latency.measure_latency` does in a trial). It prints:

1. every window's median, per compile (a column that moves in every row is machine-wide drift;
   a compile steadily above its twin is compile-to-compile difference);
2. the spread of each kind: the calls inside one window, one compile's windows across rounds, and
   twin compiles of one candidate in the same round;
3. the **noise ceiling** of each way of measuring: two independent measurements of every candidate,
   each made of k windows from other rounds (k = 1 is today's gate; k adjacent rounds is a gate that
   spreads its timing over k windows in time), drawn many times; Kendall τ between the two and their
   median relative difference;
4. with ``--continuous S``: the first ``--trace`` candidates each timed without a break for S
   seconds, and how much the median of a block of calls moves between blocks, by block length
   (does timing longer, without spreading, steady the figure?);
5. with ``--reference``: a fixed reference model (the space's all-int8 unpruned candidate) is timed
   at the start and at the end of every round, and every candidate's window is also read as a
   ratio to it, scaled back to milliseconds by the reference's median over all rounds. Drift and
   the noise ceiling are printed both ways: does a reference timed beside the candidate cancel
   the machine's level switches? ``--pause S`` sleeps between rounds, so that the rounds span the
   minutes over which this VM has been seen to change speed. With ``--block N`` the reference is
   also interleaved inside every window (N calls of the candidate, N of the reference), and the
   window is read as a ratio to those calls.

Read it with the machine in mind: the figures describe the minutes it ran in. Run it alone.

Usage:
    python experiments/bench_gate_noise.py                       # digits ResNet-18, 10 x 2 compiles x 20 rounds
    python experiments/bench_gate_noise.py --candidates 16 --compiles 1 --rounds 30 --continuous 20
    python experiments/bench_gate_noise.py --candidates 8 --compiles 1 --rounds 20 --reference --pause 20
    python experiments/bench_gate_noise.py --candidates 8 --compiles 1 --rounds 18 --reference --block 5
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

BLOCKS_S = (0.15, 0.5, 1.0, 2.0, 5.0)


def compiled(task, cand, x, calib):
    """``cand`` compressed, PTQ-prepared, lowered and compiled at one thread, as a trial's gate does."""
    import autoshrink as ash
    from autoshrink.compress import compress
    from autoshrink.compress.quantize import compile_checked, lower, prepare_ptq
    from autoshrink.measure.latency import fixed_threads

    comp = compress(task.model, cand, task.example_input)
    ptq = prepare_ptq(comp.pruned, ash.Candidate(bits=dict(comp.bits), default_bits=32), x, calib)
    comp.verify(ptq)
    with fixed_threads(1):  # Inductor's CPU kernels take the thread count at compile time
        return compile_checked(lower(ptq), x)


def deployables(task, space, n: int, compiles: int, seed: int):
    """``n`` sampled candidates, each lowered and compiled ``compiles`` times as a trial's gate does."""
    import optuna

    from autoshrink.record import STUDY_DIRECTIONS

    study = optuna.create_study(directions=STUDY_DIRECTIONS, sampler=optuna.samplers.RandomSampler(seed=seed))
    x = task.example_input[:1]
    calib = list(task.calibration_batches())
    out = []
    for k in range(n):
        cand = space.sample(study.ask())
        for c in range(compiles):
            out.append(((k, c), compiled(task, cand, x, calib)))
    return x, out


def timed_rounds(models, x, rounds: int, runs: int, warmup: int, pause_s: float = 0.0,
                 beside=None, block: int = 0) -> tuple[dict, dict]:
    """Per model, one list of ``runs`` call times (ms) per round, the models interleaved in every
    round, ``pause_s`` seconds of sleep between rounds. With ``beside`` (a reference model) and
    ``block``, each model's window alternates ``block`` calls of it with ``block`` calls of the
    reference; the second dict holds those reference calls, per model and round."""
    import torch

    from autoshrink.measure.latency import fixed_threads, time_calls

    calls = {key: [] for key, _ in models}
    ref_calls = {key: [] for key, _ in models}
    with fixed_threads(1), torch.inference_mode():
        for _, m in models:
            m(x)
        for r in range(rounds):
            if r and pause_s > 0:
                time.sleep(pause_s)
            for key, m in models:
                for _ in range(warmup):
                    m(x)
                if beside is None or block < 1:
                    calls[key].append(time_calls(m, x, runs))
                    continue
                mine, ref = [], []
                while len(mine) < runs:
                    mine += time_calls(m, x, min(block, runs - len(mine)))
                    ref += time_calls(beside, x, block)
                calls[key].append(mine)
                ref_calls[key].append(ref)
    return calls, ref_calls


def normalised_beside(calls: dict, ref_calls: dict) -> dict:
    """Each window read as a ratio to the reference calls interleaved with it, scaled back to ms
    by the reference's median over every window."""
    typical = statistics.median(statistics.median(w) for ws in ref_calls.values() for w in ws)
    return {key: [[t * typical / statistics.median(ref) for t in w] for w, ref in zip(ws, ref_calls[key], strict=True)]
            for key, ws in calls.items()}


def estimate(how: str, windows: list[list[float]]) -> float:
    """One measurement from ``windows`` of call times: ``median`` of all calls, ``p10`` of all
    calls, ``min-median`` (the lowest window median) or ``min`` (the fastest call)."""
    pooled = [t for w in windows for t in w]
    if how == "median":
        return statistics.median(pooled)
    if how == "p10":
        return statistics.quantiles(pooled, n=10)[0]
    if how == "min-median":
        return min(statistics.median(w) for w in windows)
    if how == "min":
        return min(pooled)
    raise ValueError(how)


def ceiling(per_candidate: list[list[list[float]]], how: str, k: int, adjacent: bool, draws: int,
            rng: random.Random) -> tuple[float, float]:
    """Mean Kendall τ and mean median relative difference between two independent measurements of
    every candidate, each from ``k`` windows (adjacent rounds, or any rounds), drawn ``draws`` times."""
    from autoshrink.measure.calibration import score

    rounds = len(per_candidate[0])
    taus, diffs = [], []
    for _ in range(draws):
        first, second = [], []
        for windows in per_candidate:
            if adjacent:
                while True:
                    i, j = rng.randrange(rounds - k + 1), rng.randrange(rounds - k + 1)
                    if abs(i - j) >= k:
                        break
                a, b = windows[i:i + k], windows[j:j + k]
            else:
                picked = rng.sample(range(rounds), 2 * k)
                a, b = [windows[i] for i in picked[:k]], [windows[i] for i in picked[k:]]
            first.append(estimate(how, a))
            second.append(estimate(how, b))
        tau, diff = score(first, second)
        taus.append(tau)
        diffs.append(diff)
    return statistics.mean(taus), statistics.mean(diffs)


def cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.mean(values)


def continuous(models, x, seconds: float) -> None:
    """Each model timed without a break for ``seconds``; the spread of block medians by block length."""
    import torch

    from autoshrink.measure.latency import fixed_threads, time_calls

    print(f"[continuous] {len(models)} compiled candidates, each timed without a break for {seconds:g} s; "
          "coefficient of variation (range) of the median of consecutive blocks of calls:")
    with fixed_threads(1), torch.inference_mode():
        for key, m in models:
            for _ in range(20):
                m(x)
            times, end = [], time.perf_counter() + seconds
            while time.perf_counter() < end:
                times.extend(time_calls(m, x, 10))
            typical = statistics.median(times)
            cells = []
            for block_s in BLOCKS_S:
                n = max(1, int(block_s * 1e3 / typical))
                medians = [statistics.median(times[i:i + n]) for i in range(0, len(times) - n + 1, n)]
                if len(medians) >= 3:
                    spread = f"{cv(medians):.1%} ({min(medians):.2f}-{max(medians):.2f})"
                    cells.append(f"{block_s:g} s ({n} calls): {spread}")
            print(f"  candidate {key[0]} ({typical:.2f} ms, {len(times)} calls): " + " | ".join(cells), flush=True)


def normalised(calls: dict, first, last) -> dict:
    """Every model's windows read as ratios to the reference timed at the start (``first``) and at
    the end (``last``) of the same round, scaled back to ms by the reference's median over all
    rounds: each call of round r times ``median(ref) / mean(ref window medians of round r)``."""
    ref = [(statistics.median(a) + statistics.median(b)) / 2 for a, b in zip(calls[first], calls[last], strict=True)]
    typical = statistics.median(ref)
    return {key: [[t * typical / ref[r] for t in w] for r, w in enumerate(ws)]
            for key, ws in calls.items() if key not in (first, last)}


def report(calls: dict, args, rng: random.Random, label: str) -> None:
    """Drift and the noise ceiling of ``calls`` (first compile of each candidate)."""
    medians = {key: [statistics.median(w) for w in ws] for key, ws in calls.items()}
    across = statistics.median(cv(row) for row in medians.values())
    first_third = max(1, args.rounds // 3)
    drift = [statistics.median(row[-first_third:]) / statistics.median(row[:first_third]) for row in medians.values()]
    print(f"[{label}] one compile's window medians across rounds: median coefficient of variation {across:.1%}; "
          f"last third over first third {min(drift):.2f}-{max(drift):.2f}x (median {statistics.median(drift):.2f}x)")
    per_candidate = [calls[(k, 0)] for k in range(args.candidates)]
    for how, k, adjacent, text in (
            ("median", 1, True, "median of 1 window (the gate today)"),
            ("median", 3, True, "median of 3 adjacent windows"),
            ("median", 3, False, "median of 3 windows from any rounds")):
        tau, diff = ceiling(per_candidate, how, k, adjacent, args.draws, rng)
        print(f"  {label}: {text:<40} tau {tau:.2f}  median difference {diff:.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits", help="a built-in digits task, untrained (digits, digits-resnet20, ...)")
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--compiles", type=int, default=2, help="compilations of each candidate (twins)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--runs", type=int, default=60, help="timed calls in a window (the gate's default)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before each window (the gate's default)")
    p.add_argument("--draws", type=int, default=300, help="resampled pairs of measurements per estimate")
    p.add_argument("--continuous", type=float, default=0.0, help="seconds of unbroken timing per traced candidate")
    p.add_argument("--trace", type=int, default=4, help="candidates timed with --continuous")
    p.add_argument("--reference", action="store_true",
                   help="time a fixed reference model at the start and end of every round, and report every "
                        "figure also as a ratio to it (scaled back to ms)")
    p.add_argument("--pause", type=float, default=0.0, help="seconds of sleep between rounds")
    p.add_argument("--block", type=int, default=0,
                   help="with --reference: also interleave the reference inside every window, BLOCK calls of "
                        "the candidate then BLOCK of the reference, and report the ratio to those calls")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.rounds < 6 or args.candidates < 3:
        raise SystemExit("--rounds must be at least 6 and --candidates at least 3 (two measurements of k "
                         "windows each, k up to 3, and a ranking needs a few candidates)")

    from bench_overhead import untrained_task

    from autoshrink import _env

    _env.configure()
    task, space = untrained_task(args.task)
    start = time.perf_counter()
    print(f"task {args.task} (untrained: timings depend on the shapes, not the weights); {os.cpu_count()} cores; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    x, models = deployables(task, space, args.candidates, args.compiles, args.seed)
    if args.reference:
        import autoshrink as ash

        ref = compiled(task, ash.Candidate.uniform(bits=8), x, list(task.calibration_batches()))
        models = [(("ref", "start"), ref), *models, (("ref", "end"), ref)]
    print(f"compiled {len(models)} models in {time.perf_counter() - start:.0f} s", flush=True)
    t0 = time.perf_counter()
    calls, beside = timed_rounds(models, x, args.rounds, args.runs, args.warmup, args.pause,
                                 beside=ref if args.reference else None, block=args.block)
    window_s = (time.perf_counter() - t0) / args.rounds
    print(f"[windows] {args.rounds} rounds x {len(models)} models x ({args.warmup} + {args.runs} calls), a round "
          f"every {window_s:.1f} s; the median of each window (ms):")
    medians = {key: [statistics.median(w) for w in ws] for key, ws in calls.items()}
    for key, row in medians.items():
        print(f"  candidate {key[0]} compile {key[1]}: " + " ".join(f"{v:6.2f}" for v in row))

    within = statistics.median(cv(w) for ws in calls.values() for w in ws)
    across = statistics.median(cv(row) for row in medians.values())
    print(f"[spread] calls inside one window: median coefficient of variation {within:.1%}; one compile's "
          f"window medians across rounds: {across:.1%}")
    if args.compiles > 1:
        twins = [abs(statistics.median(medians[(k, 0)]) / statistics.median(medians[(k, c)]) - 1)
                 for k in range(args.candidates) for c in range(1, args.compiles)]
        print(f"[spread] twin compiles of one candidate (the medians of their windows): median difference "
              f"{statistics.median(twins):.1%}, largest {max(twins):.1%}")
    first_third = max(1, args.rounds // 3)
    drift = [statistics.median(row[-first_third:]) / statistics.median(row[:first_third]) for row in medians.values()]
    print(f"[drift] last third of the rounds over the first third, per model: {min(drift):.2f}-{max(drift):.2f}x "
          f"(median {statistics.median(drift):.2f}x)")

    rng = random.Random(args.seed)
    per_candidate = [calls[(k, 0)] for k in range(args.candidates)]
    print(f"[ceiling] two independent measurements of each of the {args.candidates} candidates (first compile), "
          f"{args.draws} draws: Kendall tau between them, median relative difference")
    for how, k, adjacent, label in (
            ("median", 1, True, "median of 1 window (the gate today)"),
            ("p10", 1, True, "10th percentile of 1 window"),
            ("min", 1, True, "fastest call of 1 window"),
            ("median", 2, True, "median of 2 adjacent windows"),
            ("median", 3, True, "median of 3 adjacent windows"),
            ("min-median", 3, True, "lowest of 3 adjacent window medians"),
            ("median", 3, False, "median of 3 windows from any rounds")):
        tau, diff = ceiling(per_candidate, how, k, adjacent, args.draws, rng)
        print(f"  {label:<40} tau {tau:.2f}  median difference {diff:.1%}")
    if args.reference:
        print(f"[reference] the all-int8 unpruned model timed at the start and end of each round; {args.rounds} "
              f"rounds over {(time.perf_counter() - t0) / 60:.1f} min; raw figures, then as ratios to it:")
        raw = {key: ws for key, ws in calls.items() if key[0] != "ref"}
        report(raw, args, random.Random(args.seed), "raw")
        report(normalised(calls, ("ref", "start"), ("ref", "end")), args, random.Random(args.seed), "ratio")
        if args.block > 0:
            print(f"[beside] the reference interleaved inside every window, {args.block} calls at a time:")
            report(normalised_beside(raw, {key: beside[key] for key in raw}), args, random.Random(args.seed),
                   "ratio beside")
    if args.continuous > 0:
        continuous([(key, m) for key, m in models if key[1] == 0][:args.trace], x, args.continuous)
    print(f"{time.perf_counter() - start:.0f} s in all; load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

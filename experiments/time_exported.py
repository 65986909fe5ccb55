"""Time an exported model in a fresh process, exactly as the search timed it.

Loads ``model.pt2`` with :func:`autoshrink.export.load_deployable` (torch.export.load, Inductor
with freezing, torch.compile) and measures it with the search's own
:func:`autoshrink.measure.latency.measure_latency`: batch 1, 1 thread, 10 warm-up and 60 timed
calls, median, inside the machine lock (so a running search does not disturb it). If the export
folder has a ``metrics.json``, the latency the search recorded for that trial is printed next to it.

Usage:
    python experiments/time_exported.py runs/demo/best/model.pt2 [--runs 60] [--threads 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def example_input(ep: torch.export.ExportedProgram) -> torch.Tensor:
    """A random batch-1 input shaped like the program's user input."""
    name = next(s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT")
    node = next(n for n in ep.graph.nodes if n.name == name)
    val = node.meta["val"]
    shape = [1] + [int(d) for d in val.shape[1:]]
    return torch.randn(*shape, dtype=val.dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model.pt2 written by autoshrink export")
    p.add_argument("--runs", type=int, default=60, help="timed calls (the search's default: 60)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1)")
    p.add_argument("--repeat", type=int, default=1, help="measure this many times (spread)")
    args = p.parse_args()

    from autoshrink.export import load_deployable, load_program
    from autoshrink.measure.latency import MachineLock, measure_latency

    path = Path(args.model)
    x = example_input(load_program(path))
    model = load_deployable(path)
    lock = MachineLock()
    medians = []
    for _ in range(args.repeat):
        lat = measure_latency(model, x, runs=args.runs, threads=args.threads, lock=lock)
        medians.append(lat.median_ms)
        print(f"median {lat.median_ms:.3f} ms (IQR {lat.p25_ms:.3f}-{lat.p75_ms:.3f} ms), "
              f"batch 1, {lat.threads} thread(s), {lat.runs} runs, input {tuple(x.shape)}")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores - 1:
        print(f"warning: load average {load:.1f} on {cores} cores; other processes share the CPU, "
              "so these figures overstate the latency (the machine lock only excludes autoshrink)")
    metrics = path.parent / "metrics.json"
    if metrics.is_file():
        recorded = json.loads(metrics.read_text()).get("trial", {}).get("latency_ms")
        if recorded:
            best = min(medians)
            print(f"recorded by the search: {recorded:.3f} ms; this process: {best:.3f} ms "
                  f"({100 * (best / recorded - 1):+.1f}%)")


if __name__ == "__main__":
    main()

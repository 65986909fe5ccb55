"""The same models in each deployment runtime: batch-1 latency (with spread) and accuracy.

For the built-in task (digits: its teacher is trained on first use, then cached) this builds
the fp32 teacher, the teacher at uniform int8 (PTQ: the search's own compress -> prepare_ptq ->
lower path, calibrated on a few training batches) and, with ``--run DIR``, the chosen model of a
finished search at its budget (its best trial; the run may have searched in any runtime), in
Inductor, ONNX Runtime and OpenVINO; then times every deployable in one run
(the search's rules: batch 1, fixed threads, warm-up, median of ``--runs`` calls, inter-quartile
range, inside the machine lock), and scores each on the validation split in its runtime. The
``int8 layers`` column is what each runtime's compiled graph really runs in int8.

Usage:
    python experiments/compare_runtimes.py [--task digits] [--run runs/demo] [--runs 60] [--threads 1]
        [--runtimes inductor,onnxruntime,openvino] [--markdown table.md]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def lowered_models(task, run: str | None) -> dict[str, object]:
    """name -> lowered model (fp32 module or lowered PT2E graph)."""
    import copy

    from autoshrink import Candidate
    from autoshrink.compress import compress
    from autoshrink.compress.quantize import lower, prepare_ptq

    x = task.example_input
    out: dict[str, object] = {"teacher fp32": copy.deepcopy(task.model).eval()}
    comp = compress(task.model, Candidate.uniform(bits=8), x)
    calib = list(task.calibration_batches())
    out["uniform int8 (PTQ)"] = lower(prepare_ptq(comp.pruned, Candidate(bits=comp.bits, default_bits=32), x, calib))
    if run:
        import autoshrink as ash
        from autoshrink.export import load_program
        from autoshrink.record import StudyAttr

        result = ash.load(run)
        best = result.best
        if best is None:
            print(f"{run}: no trial meets the budget; the chosen model is left out")
        else:
            number = int(best["number"])
            path = Path(run) / "trials" / f"{number:04d}" / "model.pt2"
            if not path.is_file():
                print(f"{path}: the best trial saved no model; the chosen model is left out")
            else:
                # the search's own choice at its budget, chosen in the runtime it ran in; model.pt2
                # (kept in every runtime) is the program each runtime here builds from
                searched_in = result.meta.get(StudyAttr.RUNTIME) or "inductor"
                label = f"chosen (trial {number}, {result.budget.describe()} in {searched_in})"
                out[label] = load_program(path).module()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits", help="a built-in task (default digits)")
    p.add_argument("--run", help="a finished search's folder: include its best trial")
    p.add_argument("--runs", type=int, default=60, help="timed calls per model (default 60)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--runtimes", help="comma-separated (default: every installed runtime)")
    p.add_argument("--markdown", help="also write the table to this Markdown file")
    args = p.parse_args()

    import autoshrink as ash
    from autoshrink import runtimes
    from autoshrink.measure.latency import MachineLock

    names = args.runtimes.split(",") if args.runtimes else runtimes.available()
    chosen = {n: runtimes.get(n) for n in names}  # an unknown or missing runtime stops here, in one line
    task = ash.tasks.get(args.task)
    x = task.example_input
    models = lowered_models(task, args.run)

    # build everything first (heavy), then time everything back to back, then score
    built: dict[tuple[str, str], object] = {}
    for model_name, lowered in models.items():
        for rt_name, rt in chosen.items():
            t0 = time.perf_counter()
            try:
                built[model_name, rt_name] = rt.build(copy_of(lowered), x, threads=args.threads)
            except Exception as exc:  # a model a runtime cannot take is a row, not a crash
                built[model_name, rt_name] = exc
            print(f"built {model_name} in {rt_name} ({time.perf_counter() - t0:.1f} s)", flush=True)
    lock = MachineLock()
    latency = {key: runtimes.time_runtime(dep, x, runs=args.runs, lock=lock)
               for key, dep in built.items() if not isinstance(dep, Exception)}
    accuracy = {key: runtimes.evaluate(dep, task.loader("val", 256, shuffle=False), pad_to=256)
                for key, dep in built.items() if not isinstance(dep, Exception)}

    header = ["model", "runtime", "version", "threads", "latency ms (median)", "IQR ms", "vs teacher",
              "accuracy %", "int8 layers"]
    rows = []
    for (model_name, rt_name), dep in built.items():
        if isinstance(dep, Exception):
            first = str(dep).splitlines()[0][:80] if str(dep) else type(dep).__name__
            rows.append([model_name, rt_name, chosen[rt_name].version(), str(args.threads), "failed", first,
                         "", "", ""])
            continue
        lat, (acc, se) = latency[model_name, rt_name], accuracy[model_name, rt_name]
        teacher = latency.get(("teacher fp32", rt_name))
        speedup = f"{teacher.median_ms / lat.median_ms:.2f}x" if teacher else ""
        kernels = dep.kernels()
        int8 = f"{sum(v == 'int8' for v in kernels.values())}/{len(kernels)}" if kernels is not None else "n/a"
        rows.append([model_name, rt_name, lat.info.version.split("-")[0], str(lat.info.threads),
                     f"{lat.median_ms:.3f}", f"{lat.p25_ms:.3f}-{lat.p75_ms:.3f}", speedup,
                     f"{acc:.2f} ± {se:.2f}", int8])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    note = (f"batch 1, {args.runs} timed runs per model, task {task.name}, load average {load:.1f} on {cores} cores"
            + ("; other processes share the CPU, so the figures overstate latency" if load > cores - 1 else ""))
    print(note)
    if args.markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        Path(args.markdown).write_text("\n".join(lines) + f"\n\n{note}\n")


def copy_of(model):
    """Each runtime gets its own copy: building drops unused weights and Inductor freezes constants."""
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    main()

"""The same models in each deployment runtime: batch-1 latency (with spread) and accuracy.

For the built-in task (digits: its teacher is trained on first use, then cached) this builds,
in Inductor, ONNX Runtime and OpenVINO:

- the fp32 teacher;
- the teacher at uniform int8 (PTQ: the search's own compress -> prepare_ptq -> lower path,
  calibrated on a few training batches);
- **the chosen model at one budget in each runtime**: a short search in that runtime
  (``search(task, None, Budget(latency_ms=--budget-ms), trials=--trials, runtime=RT)``, its run
  folder under ``--out``), or an earlier run of that runtime (``--run RT=DIR``); its shipped
  ``best/`` artifact is loaded in that runtime (``model.pt2``, ``model.onnx``, ``model.xml``);
- with ``--run DIR`` (no ``RT=``), a finished search's best trial (``model.pt2``) in every runtime.

The searches run first; then every deployable is timed back to back in this one process (the
search's rules: :func:`autoshrink.runtimes.time_runtime`, batch 1, fixed threads, warm-up, median
of ``--runs`` calls, inter-quartile range, inside the machine lock), and each is scored on the
validation split in its runtime (:func:`autoshrink.runtimes.evaluate`). The ``int8 layers`` column
is what each runtime's compiled graph really runs in int8. Library notices are silenced
(``autoshrink._env.quiet``), so the table is what is printed.

Usage:
    python experiments/compare_runtimes.py [--task digits] [--budget-ms 5] [--trials 3] [--out runs/compare]
        [--run onnxruntime=runs/ort] [--no-search] [--run runs/demo] [--runs 60] [--threads 1]
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


def chosen_runs(args, names: list[str], task) -> dict[str, Path]:
    """runtime -> the run folder whose ``best/`` is that runtime's chosen model: given with
    ``--run RT=DIR``, else a short search in that runtime now (unless ``--no-search``)."""
    import autoshrink as ash

    given: dict[str, Path] = {}
    for spec in args.run or []:
        if "=" in spec:
            rt_name, _, folder = spec.partition("=")
            if rt_name not in names:
                raise SystemExit(f"--run {spec}: {rt_name!r} is not one of the runtimes compared ({', '.join(names)})")
            given[rt_name] = Path(folder)
    out: dict[str, Path] = {}
    for rt_name in names:
        if rt_name in given:
            out[rt_name] = given[rt_name]
            continue
        if args.no_search:
            continue
        folder = Path(args.out) / rt_name
        t0 = time.perf_counter()
        print(f"searching in {rt_name}: {args.trials} trial(s) at {args.budget_ms:g} ms -> {folder}", flush=True)
        try:
            ash.search(task, None, ash.Budget(latency_ms=args.budget_ms), trials=args.trials, runtime=rt_name,
                       out=folder, latency_threads=args.threads, progress=False,
                       seed=args.seed)
        except Exception as exc:  # noqa: BLE001 - one runtime's failed search is a line, the others go on
            print(f"the search in {rt_name} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                  "its chosen model is left out", flush=True)
            continue
        print(f"searched in {rt_name} ({time.perf_counter() - t0:.0f} s)", flush=True)
        out[rt_name] = folder
    return out


def chosen_deployables(runs: dict[str, Path], chosen_rt: dict, threads: int) -> tuple[dict, dict[str, str]]:
    """(model name, runtime) -> its run's ``best/`` artifact loaded in that runtime (or the exception),
    and model name -> what its search recorded for it (a note under the table)."""
    import autoshrink as ash

    built: dict[tuple[str, str], object] = {}
    notes: dict[str, str] = {}
    for rt_name, folder in runs.items():
        try:
            result = ash.load(folder)
        except Exception as exc:  # noqa: BLE001 - not a run folder: said, and left out
            print(f"{folder}: cannot be read as a run folder ({exc}); the chosen model in {rt_name} is left out")
            continue
        best = result.best
        if best is None:
            print(f"{folder}: no trial meets {result.budget.describe()}; the chosen model in {rt_name} is left out")
            continue
        searched_in = best.get("runtime")
        searched_in = searched_in if isinstance(searched_in, str) and searched_in else "inductor"
        if searched_in != rt_name:
            print(f"{folder}: searched in {searched_in}, not {rt_name}; the chosen model in {rt_name} is left out")
            continue
        name = f"chosen, {result.budget.describe()} (trial {int(best['number'])})"
        t0 = time.perf_counter()
        try:
            built[name, rt_name] = chosen_rt[rt_name].load(folder / "best", threads=threads)
        except Exception as exc:  # noqa: BLE001 - a missing/unloadable artifact is a row
            built[name, rt_name] = exc
        print(f"loaded {name} in {rt_name} from {folder / 'best'} ({time.perf_counter() - t0:.1f} s)", flush=True)
        lat = best.get("latency_ms_effective")
        lat = best.get("latency_ms") if lat is None or lat != lat else lat
        source = best.get("latency_source") or "gate"
        notes[f"{name} in {rt_name}"] = (f"its search recorded {float(lat):.3f} ms ({source}), "
                                         f"accuracy {float(best['accuracy']):.2f} %")
    return built, notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits", help="a built-in task (default digits)")
    p.add_argument("--budget-ms", type=float, default=5.0, help="the chosen model's latency budget (default 5)")
    p.add_argument("--trials", type=int, default=3, help="trials of each runtime's search (default 3)")
    p.add_argument("--seed", type=int, default=0, help="the searches' seed (default 0)")
    p.add_argument("--out", default=None, help="where the searches' run folders go (default runs/compare-<time>)")
    p.add_argument("--run", action="append", metavar="[RT=]DIR",
                   help="RT=DIR: that runtime's chosen model from an earlier run of it, no search; "
                        "DIR: also a finished search's best trial (model.pt2) in every runtime (repeatable)")
    p.add_argument("--no-search", action="store_true", help="no searches: chosen models only from --run RT=DIR")
    p.add_argument("--runs", type=int, default=60, help="timed calls per model (default 60)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--runtimes", help="comma-separated (default: every installed runtime)")
    p.add_argument("--markdown", help="also write the table to this Markdown file")
    args = p.parse_args()
    args.out = args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}"

    from autoshrink import _env

    _env.configure()
    _env.quiet()  # the libraries' notices, not the table, would fill the screen

    import autoshrink as ash
    from autoshrink import runtimes
    from autoshrink.measure.latency import MachineLock

    names = args.runtimes.split(",") if args.runtimes else runtimes.available()
    chosen = {n: runtimes.get(n) for n in names}  # an unknown or missing runtime stops here, in one line
    plain = [r for r in args.run or [] if "=" not in r]
    if len(plain) > 1:
        raise SystemExit(f"--run DIR (no RT=) is given {len(plain)} times: give one")
    task = ash.tasks.get(args.task)
    x = task.example_input
    runs = chosen_runs(args, names, task)  # the searches first: they time on their own
    models = lowered_models(task, plain[0] if plain else None)

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
    picked, notes = chosen_deployables(runs, chosen, args.threads)
    built.update(picked)
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
    rows.sort(key=lambda r: names.index(r[1]))  # grouped by runtime, in the order built
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    note = (f"batch 1, {args.runs} timed runs per model, task {task.name}, load average {load:.1f} on {cores} cores"
            + ("; other processes share the CPU, so the figures overstate latency" if load > cores - 1 else ""))
    lines = [note] + [f"{k}: {v}" for k, v in notes.items()]
    print("\n".join(lines))
    if args.markdown:
        md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        Path(args.markdown).write_text("\n".join(md) + "\n\n" + "\n\n".join(lines) + "\n")


def copy_of(model):
    """Each runtime gets its own copy: building drops unused weights and Inductor freezes constants."""
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    main()

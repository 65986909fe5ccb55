"""The ``autoshrink`` command: parses arguments and calls the Python API, nothing more."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]

EXIT_USAGE = 2


class CliError(Exception):
    """A user error to print as one line (exit code 2)."""


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoshrink",
        description="Find how to shrink a trained PyTorch model to a hardware budget.",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("search", help="search for the best compression under a budget")
    s.add_argument("--budget-ms", type=_positive(float), help="latency budget (ms, batch 1)")
    s.add_argument("--budget-mb", type=_positive(float), help="size budget (MB)")
    s.add_argument("--budget-mmacs", type=_positive(float), help="compute budget (million MACs)")
    s.add_argument("--max-drop", type=_positive(float),
                   help="accuracy-constraint mode: the fastest model within this many points of the teacher")
    s.add_argument("--task", default=None, help="built-in task (default: digits)")
    s.add_argument("--space", default=None, help="search space YAML (default: the bundled default.yaml)")
    s.add_argument("--trials", type=_positive(int), default=12, help="trials in total (default 12)")
    s.add_argument("--workers", type=_positive(int), default=None, help="trials at once (default: cores/2)")
    s.add_argument("--out", default=None, help="run folder (default runs/<timestamp>)")
    s.add_argument("--resume", action="store_true", help="continue the search in --out")
    s.add_argument("--ray-address", default=None, help="join an existing Ray cluster (ray start --head)")
    s.add_argument("--storage", default=None, help="Optuna storage URL shared by several drivers")
    s.add_argument("--study-name", default="autoshrink")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random"])
    s.add_argument("--latency-threads", type=_positive(int), default=1)
    s.add_argument("--no-early-stopping", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    _task_args(s)

    pa = sub.add_parser("pareto", help="plot the Pareto front of a run")
    pa.add_argument("dir")
    pa.add_argument("--plot", default=None, help="PNG path (default DIR/pareto.png)")
    pa.add_argument("--html", default=None, help="interactive HTML path (default DIR/pareto.html)")

    e = sub.add_parser("export", help="export a trial's deployable model")
    e.add_argument("dir")
    e.add_argument("--trial", type=int, default=None, help="trial number (default: the best)")
    e.add_argument("-o", "--output", required=True, help="output folder")
    e.add_argument("--onnx", action="store_true", help="also write model.onnx")

    sh = sub.add_parser("show", help="print a run's front and the chosen trial's plan")
    sh.add_argument("dir")

    se = sub.add_parser("sensitivity", help="per-layer accuracy drop by bits / pruning level")
    se.add_argument("--task", default=None)
    se.add_argument("--limit", type=_positive(int), default=1000, help="validation samples used")
    se.add_argument("--plot", default="sensitivity.png")
    se.add_argument("--csv", default=None)
    se.add_argument("--narrow", default=None, metavar="SPACE.yaml",
                    help="write a narrowed copy of --space here")
    se.add_argument("--space", default=None)
    se.add_argument("--max-drop", type=_positive(float), default=1.0)
    _task_args(se)
    return p


def _task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="your model factory, pkg.module:function")
    p.add_argument("--checkpoint", default=None, help="state_dict file for --model (weights_only)")
    p.add_argument("--data", default=None, help="imagefolder:DIR or cifar10:DIR")
    p.add_argument("--num-classes", type=_positive(int), default=None)


def _build_task(args):
    from autoshrink import tasks

    if args.model or args.data:
        from autoshrink.tasks.custom import task_from_cli

        return task_from_cli(model=args.model, checkpoint=args.checkpoint, data=args.data,
                             task=args.task, num_classes=args.num_classes)
    return tasks.get(args.task or "digits", progress=not getattr(args, "no_progress", False))


def _cmd_search(args) -> int:
    import autoshrink as ash
    from autoshrink.report import front_table, plan_table

    budget = ash.Budget(latency_ms=args.budget_ms, size_mb=args.budget_mb, mmacs=args.budget_mmacs)
    if not budget.constraints() and args.max_drop is None:
        raise CliError("give a budget (--budget-ms, --budget-mb, --budget-mmacs) or --max-drop")
    if args.resume and not args.out:
        raise CliError("--resume needs --out DIR (the run folder to continue)")
    space = ash.SearchSpace.from_yaml(args.space) if args.space else ash.SearchSpace.default()
    task = _build_task(args)
    result = ash.search(
        task, space, budget, trials=args.trials, workers=args.workers, out=args.out,
        resume=args.resume, seed=args.seed, sampler=args.sampler, storage=args.storage,
        study_name=args.study_name, ray_address=args.ray_address,
        latency_threads=args.latency_threads, early_stopping=not args.no_early_stopping,
        progress=not args.no_progress, max_drop=args.max_drop,
    )
    _print_summary(result, front_table, plan_table)
    return 0


def _print_summary(result, front_table, plan_table) -> None:
    from rich.console import Console

    console = Console()
    t = result.teacher
    df = result.trials
    counts = df["state"].value_counts().to_dict()
    infeasible = int(((df["state"] == "COMPLETE") & (df["meets_budget"] == False)).sum())  # noqa: E712
    console.print(
        f"\n[bold]{len(df)} trials[/bold]: {counts.get('COMPLETE', 0)} complete "
        f"({infeasible} missed the budget, not fine-tuned), {counts.get('PRUNED', 0)} stopped early, "
        f"{counts.get('FAIL', 0)} failed. Budget: {result.budget.describe()}."
    )
    if len(result.frontier):
        console.print(front_table(result.frontier, {"accuracy": "max", "latency_ms": "min"}))
    best = result.best
    if best is None:
        console.print("[bold red]No trial meets the budget.[/bold red] Closest trials:")
        near = result.nearest()
        for _, row in near.iterrows():
            console.print(f"  trial {int(row['number'])}: latency {row['latency_ms']:.2f} ms, "
                          f"size {row['size_mb']:.2f} MB (over by {row['violation']:.0%})")
    else:
        n = int(best["number"])
        console.print(
            f"\n[bold green]Chosen: trial {n}[/bold green]  accuracy {best['accuracy']:.2f} "
            f"± {best['accuracy_se']:.2f} % (teacher {t.get('accuracy', float('nan')):.2f} %), "
            f"latency {best['latency_ms']:.2f} ms (teacher fp32 compiled "
            f"{t.get('latency_ms', float('nan')):.2f} ms, eager {t.get('latency_ms_eager', float('nan')):.2f} ms), "
            f"size {best['size_mb']:.2f} MB (teacher {t.get('size_mb', float('nan')):.2f} MB)"
        )
        console.print(f"configuration: {result.candidate(n).summary()}")
        plan = result.layer_plan(n)
        if plan:
            console.print(plan_table(plan))
    console.print(f"\nrun folder: {result.out}  (trials.csv, pareto.png, pareto.html, report.md, best/)")


def _cmd_pareto(args) -> int:
    import autoshrink as ash

    result = ash.load(args.dir)
    png = result.plot(args.plot or f"{args.dir}/pareto.png", html=args.html or f"{args.dir}/pareto.html")
    print(f"wrote {png} and {args.html or f'{args.dir}/pareto.html'}")
    return 0


def _cmd_export(args) -> int:
    import autoshrink as ash

    result = ash.load(args.dir)
    dest = result.export(args.trial, args.output, onnx=args.onnx)
    print(f"wrote {dest}/model.pt2" + (" and model.onnx" if args.onnx else ""))
    return 0


def _cmd_show(args) -> int:
    import autoshrink as ash
    from autoshrink.report import front_table, plan_table

    _print_summary(ash.load(args.dir), front_table, plan_table)
    return 0


def _cmd_sensitivity(args) -> int:
    import autoshrink as ash
    from autoshrink.sensitivity import narrow_space, plot_sensitivity

    task = _build_task(args)
    df = ash.sensitivity(task, limit=args.limit)
    from rich.console import Console

    Console().print(df.to_string(index=False))
    plot_sensitivity(df, args.plot)
    if args.csv:
        df.to_csv(args.csv, index=False)
    if args.narrow:
        space = ash.SearchSpace.from_yaml(args.space) if args.space else ash.SearchSpace.default()
        import yaml

        narrowed = narrow_space(space, df, max_drop=args.max_drop)
        with open(args.narrow, "w") as fh:
            yaml.safe_dump(narrowed.to_dict(), fh, sort_keys=False)
        print(f"wrote {args.narrow}")
    print(f"wrote {args.plot}")
    return 0


COMMANDS = {
    "search": _cmd_search,
    "pareto": _cmd_pareto,
    "export": _cmd_export,
    "show": _cmd_show,
    "sensitivity": _cmd_sensitivity,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoshrink`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    from autoshrink.search import SearchError
    from autoshrink.space import SpaceError
    from autoshrink.task import TaskError

    expected = (CliError, SpaceError, TaskError, SearchError, ValueError, FileNotFoundError,
                PermissionError, KeyError, TypeError)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("autoshrink: interrupted", file=sys.stderr)
        return 130
    except expected as exc:
        if args.debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"autoshrink: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``autoshrink`` command: parses arguments and calls the Python API, nothing more."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from autoshrink._cliargs import catch_sigterm, check_device_args, check_task_flags, out_file, out_folder
from autoshrink._cliparser import EXIT_USAGE
from autoshrink._cliparser import parser as _parser
from autoshrink.errors import AutoshrinkError
from autoshrink.record import State, StudyAttr

__all__ = ["main"]

EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_INTERNAL = 1


class CliError(AutoshrinkError):
    """A user error to print as one line (exit code 2)."""


def _build_task(args):
    from autoshrink import tasks

    check_task_flags(args)
    # where a teacher trained here trains: the device asked for, on this machine (with a
    # cluster, this machine may have no GPU: it trains where it can)
    device = getattr(args, "device", "cpu")
    if getattr(args, "ray_address", None) and device != "cpu":
        device = "auto"
    if args.model or args.data:
        from autoshrink.tasks.custom import task_from_cli

        return task_from_cli(model=args.model, checkpoint=args.checkpoint, data=args.data,
                             task=args.task, num_classes=args.num_classes, input_size=args.input_size,
                             normalize=args.normalize or "train", data_workers=args.data_workers,
                             device=device)
    return tasks.get(args.task or "digits", progress=not getattr(args, "no_progress", False), device=device)


def _cmd_search(args) -> int:
    import autoshrink as ash
    from autoshrink.report import front_table, plan_table

    budget = ash.Budget(latency_ms=args.budget_ms, size_mb=args.budget_mb, mmacs=args.budget_mmacs)
    if not budget.constraints() and args.max_drop is None:
        raise CliError("give a budget (--budget-ms, --budget-mb, --budget-mmacs) or --max-drop")
    if args.resume and not args.out:
        raise CliError("--resume needs --out DIR (the run folder to continue)")
    if args.storage and not args.out:  # one run folder for the checks below and for the search
        import time

        args.out = f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    if args.ray_address:  # tried now, in seconds, not after a teacher trained
        from autoshrink.search.ray_backend import check_ray_address

        check_ray_address(args.ray_address)
    check_device_args(args)
    from autoshrink.runtimes import get as get_runtime

    get_runtime(args.runtime)  # its extra missing: one line, before a teacher trains
    # The space is checked against the model's architecture before the task is built: a built-in
    # teacher may train for minutes first, and a space error must show in seconds.
    from autoshrink.plan import check_space

    subject, x = _plan_subject(args)
    model = getattr(subject, "model", subject)
    space = check_space(model, x if x is not None else subject.example_input, args.space)
    if args.out or args.resume or args.storage:
        from autoshrink.search import check_run_folder

        check_run_folder(args.out, resume=args.resume, storage=args.storage,
                         study_name=args.study_name, space=space, budget=budget)
    if args.warm_start:  # before a built-in teacher trains; the teacher is checked once built
        from autoshrink.search.warm import check_warm_start

        check_warm_start(args.warm_start, space=space, runtime=args.runtime, resume=args.resume,
                         study_name=args.study_name, latency_threads=args.latency_threads)
    if x is not None and not args.resume:  # a built-in task: a budget nothing meets, before its teacher trains
        _check_reachable_early(model, x, space, budget, args)
    task = subject if x is None else _build_task(args)
    result = ash.search(
        task, args.space, budget, trials=args.trials, workers=args.workers, out=args.out,
        resume=args.resume, seed=args.seed, sampler=args.sampler, storage=args.storage,
        study_name=args.study_name, ray_address=args.ray_address, latency_target=args.latency_target,
        latency_threads=args.latency_threads, early_stopping=not args.no_early_stopping,
        progress=not args.no_progress, max_drop=args.max_drop,
        minutes=args.minutes if args.minutes and args.minutes > 0 else None, runtime=args.runtime,
        device=args.device, gpus_per_trial=args.gpus_per_trial, solver=not args.no_solver,
        predictor_screening={"auto": None, "on": True, "off": False}[args.predictor_screening],
        warm_start=args.warm_start,
    )
    _print_summary(result, front_table, plan_table)
    return 0


def _check_reachable_early(model, x, space, budget, args) -> None:
    """The search's reachability check on the untrained architecture (cost and latency do not
    depend on the weights), so that a budget no configuration meets is refused in seconds."""
    from types import SimpleNamespace

    from autoshrink.search.config import TrialSettings
    from autoshrink.search.preflight import check_reachable

    blueprint = SimpleNamespace(model=model, example_input=x, calibration_batches=lambda *a, **k: [x])
    check_reachable(blueprint, space, budget, TrialSettings(latency_threads=args.latency_threads),
                    latency=args.ray_address is None)


def _print_summary(result, front_table, plan_table) -> None:
    from rich.console import Console

    from autoshrink.finalists import OBJECTIVES_EFFECTIVE
    from autoshrink.report import baseline_text, chosen_table, finalist_lines, near_ties_text, nearest_table

    console = Console()
    df = result.trials
    console.print(f"\n[bold]{result.out}[/bold]: {_counts(df)}")
    if result.meta.get(StudyAttr.TIMED_OUT):
        console.print("[yellow]Stopped by the time limit (--minutes)[/yellow]: add --resume --out "
                      f"{result.out} (and --minutes) to run the remaining trials.")
    mode = f"; the fastest within {result.max_drop:g} points of the teacher" if result.max_drop else ""
    console.print(f"Budget: {result.budget.describe()}{mode}.")
    from autoshrink.report import where_text

    console.print(where_text(df, result.meta), highlight=False)
    failed = df.loc[df["state"] == State.FAIL, "error"].value_counts()
    for error, n in failed.head(3).items():
        console.print(f"  [red]failed[/red] ×{n}: {error[:160]}", highlight=False)
    if len(failed) > 3:
        console.print(f"  ... and {int(failed.iloc[3:].sum())} more failures (see trials.csv)")
    if len(result.frontier):
        console.print(front_table(df, OBJECTIVES_EFFECTIVE))  # deployed latency where re-timed
    best = result.best
    if best is None:
        constraints = result.budget.constraints()
        near = result.nearest() if constraints else df.iloc[:0]
        console.print("\n[bold red]No trial meets the budget[/bold red], so no model was chosen.")
        if len(near):
            console.print(nearest_table(near, constraints))
            console.print("Relax the budget, or widen the search space (fewer bits, more pruning).")
    else:
        n = int(best["number"])
        why = "the fastest within the accuracy drop" if result.max_drop else "the most accurate within the budget"
        console.print(f"\n[bold green]Chosen: trial #{n}[/bold green] ({why})")
        console.print(chosen_table(best, result.teacher))
        for line in finalist_lines(best):
            if line:
                console.print(line.replace("**", ""), highlight=False)
        try:
            console.print(f"configuration: {result.candidate(n).summary()}", highlight=False)
        except KeyError:
            pass
        if result.baseline is not None:
            console.print(baseline_text(best, *result.baseline), highlight=False)
        ties = result.near_ties()
        if len(ties):
            console.print(near_ties_text(best, ties, run=str(result.out)), highlight=False)
        plan = result.layer_plan(n)
        if plan:
            console.print(plan_table(plan, title=f"Compression plan of trial #{n}"))
    files = [name for name in ("trials.csv", "pareto.png", "pareto.html", "report.md", "best/")
             if (result.out / name).exists()]
    console.print(f"\nrun folder: {result.out}" + (f"  ({', '.join(files)})" if files else ""))
    # last, so that they are the last thing on screen beside the answer
    for line in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
    note = result.noise_note()
    if note:
        console.print(f"[bold yellow]{note}[/bold yellow]", highlight=False)


def _counts(df) -> str:
    """``12 trials: 4 complete (1 missed the budget, not fine-tuned), 8 failed``: nonzero parts."""
    states = df["state"].value_counts().to_dict()
    missed = int(((df["state"] == State.COMPLETE) & (df["meets_budget"] == False)).sum())  # noqa: E712
    parts = []
    if states.get(State.COMPLETE):
        parts.append(f"{states[State.COMPLETE]} complete"
                     + (f" ({missed} missed the budget, not fine-tuned)" if missed else ""))
    for state, text in ((State.PRUNED, "stopped early"), (State.FAIL, "failed"),
                        (State.RUNNING, "unfinished (running, or interrupted: --resume re-runs it)"),
                        (State.WAITING, "waiting")):
        if states.get(state):
            parts.append(f"{states[state]} {text}")
    return f"{len(df)} trials" + (": " + ", ".join(parts) if parts else "")


def _cmd_pareto(args) -> int:
    import autoshrink as ash

    for flag, path in (("--plot", args.plot), ("--html", args.html)):
        if path is not None:
            out_file(flag, path)
    result = ash.load(args.dir)
    html = args.html or f"{args.dir}/pareto.html"
    png = result.plot(args.plot or f"{args.dir}/pareto.png", html=html)
    print(f"wrote {png} and {html}")
    return 0


def _cmd_export(args) -> int:
    import autoshrink as ash

    out_folder("-o", args.output)
    result = ash.load(args.dir)
    try:
        dest = result.export(args.trial, args.output, onnx=args.onnx)
    except ImportError as exc:  # --onnx without the onnx extra
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"-o {args.output}: cannot write there ({exc.strerror or exc})") from None
    print(f"wrote {dest}/model.pt2" + (" and model.onnx" if args.onnx else "")
          + " (README.md there says how to load it)")
    return 0


def _cmd_show(args) -> int:
    import autoshrink as ash
    from autoshrink.report import front_table, plan_table

    _print_summary(ash.load(args.dir), front_table, plan_table)
    return 0


def _cmd_recover(args) -> int:
    from autoshrink.recover import recover

    print(recover(args.dir, force=args.force).summary())
    return 0


def _cmd_sensitivity(args) -> int:
    import autoshrink as ash
    from autoshrink.sensitivity import narrow_space, plot_sensitivity

    # everything that can be wrong with the arguments, before the (long) sensitivity run
    check_task_flags(args)
    if args.space and not args.narrow:
        raise CliError(f"--space {args.space} is read only to narrow it: add --narrow NARROWED.yaml")
    space = None
    if args.narrow:
        space = ash.SearchSpace.from_yaml(args.space) if args.space else ash.SearchSpace.default()
    for flag, path in (("--plot", args.plot), ("--csv", args.csv), ("--narrow", args.narrow)):
        if path is not None:
            out_file(flag, path)
    check_device_args(args)
    task = _build_task(args)
    df = ash.sensitivity(task, limit=args.limit, device=args.device)
    from rich.console import Console

    Console().print(df.to_string(index=False))
    plot_sensitivity(df, args.plot)
    if args.csv:
        df.to_csv(args.csv, index=False)
    if args.narrow:
        import yaml

        narrowed = narrow_space(space, df, max_drop=args.max_drop)
        with open(args.narrow, "w") as fh:
            yaml.safe_dump(narrowed.to_dict(), fh, sort_keys=False)
        print(f"wrote {args.narrow}")
    print(f"wrote {args.plot}")
    return 0


def _plan_subject(args):
    """The task (your --model/--data) or, for a built-in task, an untrained model of its
    architecture: a plan depends on the architecture only, so no teacher trains for it."""
    check_task_flags(args)
    if args.model or args.data:
        return _build_task(args), None
    from autoshrink import tasks

    return tasks.blueprint(args.task or "digits")


def _cmd_plan(args) -> int:
    import autoshrink as ash
    from autoshrink.plan import plan, render

    budget = ash.Budget(latency_ms=args.budget_ms, size_mb=args.budget_mb, mmacs=args.budget_mmacs)
    check_device_args(args)
    subject, x = _plan_subject(args)
    print(render(plan(subject, args.space, budget, example_input=x, measure=not args.no_latency,
                      runtime=args.runtime)), end="")
    return 0


def _cmd_space(args) -> int:
    from autoshrink.space.auto import auto_space, space_to_yaml

    check_device_args(args)
    subject, x = _plan_subject(args)
    model = getattr(subject, "model", subject)
    text = space_to_yaml(auto_space(model, x if x is not None else subject.example_input))
    if args.output is None:
        print(text, end="")
        return 0
    from autoshrink._files import atomic_path

    with atomic_path(args.output) as tmp:
        tmp.write_text(text)
    print(f"wrote {args.output} (edit it, then: autoshrink search --space {args.output} ...)")
    return 0


COMMANDS = {
    "plan": _cmd_plan,
    "space": _cmd_space,
    "search": _cmd_search,
    "pareto": _cmd_pareto,
    "export": _cmd_export,
    "show": _cmd_show,
    "sensitivity": _cmd_sensitivity,
    "recover": _cmd_recover,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoshrink`` command; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0): a code, as for any other outcome
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    if not args.debug:  # third-party notices a user cannot act on; --debug shows them
        from autoshrink import _env

        _env.quiet()
    # only our own user errors are one line with exit 2; anything else (a library's ValueError, an
    # internal KeyError or TypeError) is a bug to report: exit 1 with its traceback
    terminated: list[int] = []
    previous = catch_sigterm(terminated)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:
        print(f"autoshrink: {exc}" if str(exc) else "autoshrink: interrupted", file=sys.stderr)
        if terminated or getattr(exc, "sigterm", False):
            # SIGTERM: all is recorded; end now, not after the libraries' exit hooks (seconds)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_TERMINATED)
        return 130
    except AutoshrinkError as exc:
        if args.debug:
            raise
        print(f"autoshrink: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # noqa: BLE001 - not ours to phrase: the whole traceback, exit 1
        import traceback

        traceback.print_exc()
        print("autoshrink: internal error (the traceback above); please report it", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Checks of command-line flags made before any work: a task flag that does not apply, and output
paths (a file's folder is there; ``-o`` names a folder, not a model file). Each error names its flag."""

from __future__ import annotations

import signal

from autoshrink.errors import AutoshrinkError

__all__ = ["MODEL_SUFFIXES", "FlagError", "catch_sigterm", "check_device_args", "check_task_flags", "out_file",
           "out_folder"]


class FlagError(AutoshrinkError, ValueError):
    """A flag that does not apply, or an output path that cannot be written; one line, exit 2."""


# files a model is saved as: `export -o` names the folder they are written into
MODEL_SUFFIXES = (".pt2", ".onnx", ".pt", ".pth", ".xml")


def check_task_flags(args) -> None:
    """A task flag that does not apply is an error, never silently ignored."""
    if getattr(args, "checkpoint", None) and not args.model:
        raise FlagError(f"--checkpoint {args.checkpoint} needs --model pkg.module:factory (the architecture "
                        "to load it into); a built-in task trains its own teacher")
    if getattr(args, "num_classes", None) is not None and not args.model and not args.data:
        raise FlagError(f"--num-classes {args.num_classes} applies to --model (your factory's classes); "
                        f"the built-in task {args.task or 'digits'!r} has its own")


def out_file(flag: str, path: str) -> None:
    """Check that ``path`` can be written as a file before any work: its folder exists, it is no folder."""
    from pathlib import Path

    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise FlagError(f"{flag} {path} is a folder: name a file (e.g. {p / 'out.png'})")
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FlagError(f"{flag} {path}: the folder {folder} {what}: create it first or fix the path")


def out_folder(flag: str, path: str) -> None:
    """Check that ``path`` names a folder that is (or can be) there, and is not a model file's name."""
    from pathlib import Path

    p = Path(path)
    if p.suffix.lower() in MODEL_SUFFIXES and not p.is_dir():
        raise FlagError(f"{flag} {path}: {flag} names a folder (model.pt2 and its README are written into it), "
                        f"not a model file: use {flag} {p.with_suffix('')}")
    if p.exists() and not p.is_dir():
        raise FlagError(f"{flag} {path} is a file, not a folder: name a folder to write into")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FlagError(f"{flag} {path}: {parent} is a file, not a folder: fix the path")
            break


def check_device_args(args) -> None:
    """The device and data flags, checked before anything is built or trained: ``cuda`` without a
    GPU, and a flag that does not apply, are one-line errors."""
    scheme = (args.data or "").partition(":")[0]
    for flag, value in (("--input-size", args.input_size), ("--normalize", args.normalize),
                        ("--data-workers", args.data_workers)):
        if value is not None and scheme != "imagefolder":
            raise FlagError(f"{flag} applies to image folders: it needs --data imagefolder:DIR"
                           + (f" (got --data {args.data})" if args.data else ""))
    if args.command == "search":
        from autoshrink.search.gpus import plan_devices

        plan_devices(args.device, args.gpus_per_trial, args.workers, args.ray_address)
    elif hasattr(args, "device"):
        from autoshrink.device import resolve_device

        resolve_device(args.device)


def catch_sigterm(terminated: list[int]):
    """SIGTERM stops a command as Ctrl-C does (what is done is recorded; a search's driver chains
    to this handler), noting it in ``terminated``. Returns the previous handler (None: not set,
    outside the main thread)."""

    def on_term(signum, _frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        return None

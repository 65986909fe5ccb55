"""The ``autoshrink`` command's argument parser: every subcommand, flag and its help.

Kept apart from :mod:`autoshrink.cli`, which turns the parsed arguments into calls of the Python API.
"""

from __future__ import annotations

import argparse

__all__ = ["EXIT_USAGE", "Parser", "device_arg", "parser", "positive", "task_args"]

EXIT_USAGE = 2


def positive(kind: type, *, zero: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if zero else '>'} 0, got {text}")
        if not (value >= 0 if zero else value > 0):
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero else '>'} 0, got {text}")
        return value

    return parse


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the rule and the value), like every other error
    of the command; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="autoshrink",
        description="Find how to shrink a trained PyTorch model to a hardware budget.",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("search", help="search for the best compression under a budget")
    s.add_argument("--budget-ms", type=positive(float), help="latency budget (ms, batch 1)")
    s.add_argument("--budget-mb", type=positive(float), help="size budget (MB)")
    s.add_argument("--budget-mmacs", type=positive(float), help="compute budget (million MACs)")
    s.add_argument("--max-drop", type=positive(float),
                   help="accuracy-constraint mode: the fastest model within this many points of the teacher")
    s.add_argument("--task", default=None, help="built-in task (default: digits)")
    s.add_argument("--space", default=None,
                   help="search space YAML, or 'auto' (derived from the model's graph; the default for every "
                   "model but resnet18_32, whose bundled default.yaml is used)")
    s.add_argument("--trials", type=positive(int), default=12,
                   help="candidates to fine-tune (default 12); those that miss the budget are "
                        "measured and recorded but not counted (up to 4x --trials of them)")
    s.add_argument("--workers", type=positive(int), default=None,
                   help="trials at once (default: GPUs / --gpus-per-trial when trials use GPUs, else cores/2)")
    s.add_argument("--minutes", type=positive(float, zero=True), default=12.0,
                   help="start no new trial after this many minutes; the running ones finish, "
                        "--resume continues (default 12, so the default search takes ~15 min "
                        "on 2 cores; 0: no limit)")
    s.add_argument("--out", default=None, help="run folder (default runs/<timestamp>)")
    s.add_argument("--resume", action="store_true", help="continue the search in --out")
    s.add_argument("--warm-start", default=None, metavar="DIR", help="start from an earlier run's measured "
                   "trials (same teacher, space, runtime; the budget may differ); they inform the sampler only")
    s.add_argument("--ray-address", default=None, help="join an existing Ray cluster (ray start --head)")
    s.add_argument("--latency-target", default=None, metavar="RESOURCE",
                   help="custom Ray resource of the node to time latency on (default: "
                        "'latency_target' when the cluster offers it, else each trial's own machine)")
    s.add_argument("--storage", default=None, help="Optuna storage URL shared by several drivers")
    s.add_argument("--study-name", default="autoshrink")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random", "grid"],
                   help="tpe (default), nsga2, random, or grid (spaces without continuous ranges)")
    s.add_argument("--latency-threads", type=positive(int), default=1)
    s.add_argument("--runtime", default="inductor", choices=["inductor", "onnxruntime", "openvino"],
                   help="deployment runtime to time, evaluate and export in (default inductor; "
                        "onnxruntime and openvino are extras: pip install \"autoshrink[onnxruntime]\")")
    s.add_argument("--predictor-screening", default="auto", choices=["auto", "on", "off"],
                   help="record candidates the calibrated latency predictor puts far over --budget-ms as over "
                        "budget without compiling them (auto, the default: only where the predictor meets its "
                        "accuracy goal on this machine)")
    s.add_argument("--no-early-stopping", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--no-solver", action="store_true", help="skip the sensitivity x latency-table proposals")
    device_arg(s)
    s.add_argument("--gpus-per-trial", type=positive(float), default=None, metavar="G",
                   help="GPUs Ray gives each trial (default 1 with a GPU device; 0.5 packs two on one GPU)")
    task_args(s)

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

    rc = sub.add_parser("recover", help="rebuild a damaged study.db from the per-trial records in trials/")
    rc.add_argument("dir")
    rc.add_argument("--force", action="store_true", help="rebuild even if study.db is intact (it is kept aside)")

    se = sub.add_parser("sensitivity", help="per-layer accuracy drop by bits / pruning level")
    se.add_argument("--task", default=None)
    se.add_argument("--limit", type=positive(int), default=1000, help="validation samples used")
    se.add_argument("--plot", default="sensitivity.png")
    se.add_argument("--csv", default=None)
    se.add_argument("--narrow", default=None, metavar="SPACE.yaml",
                    help="write a narrowed copy of --space here")
    se.add_argument("--space", default=None)
    se.add_argument("--max-drop", type=positive(float), default=1.0)
    device_arg(se)
    task_args(se)

    # plan / space: what a search would do, and the space it would use, without training
    for cmd, text in (("plan", "what a search would do, without training"),
                      ("space", "write the search space derived from the model, to edit")):
        q = sub.add_parser(cmd, help=text)
        q.add_argument("--task", default=None, help="built-in task (default: digits)")
        if cmd == "plan":
            q.add_argument("--space", default=None, help="search space YAML or 'auto' (default: the search's)")
            q.add_argument("--budget-ms", type=positive(float), help="latency budget (ms, batch 1)")
            q.add_argument("--budget-mb", type=positive(float), help="size budget (MB)")
            q.add_argument("--budget-mmacs", type=positive(float), help="compute budget (million MACs)")
            q.add_argument("--no-latency", action="store_true", help="do not compile and time the cheapest candidate")
            q.add_argument("--runtime", default="inductor", choices=["inductor", "onnxruntime", "openvino"],
                           help="deployment runtime to time the cheapest candidate in (default inductor)")
        else:
            q.add_argument("-o", "--output", default=None, help="YAML file to write (default: print it)")
        task_args(q)
    return p


def task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="your model factory, pkg.module:function, or hf:DIR (save_pretrained)")
    p.add_argument("--checkpoint", default=None, help="state_dict file for --model (weights_only)")
    p.add_argument("--data", default=None, help="imagefolder:DIR or cifar10:DIR")
    p.add_argument("--num-classes", type=positive(int), default=None)
    p.add_argument("--input-size", type=positive(int), default=None, metavar="N",
                   help="--data imagefolder: crop images to NxN (default: the model's example input)")
    p.add_argument("--normalize", default=None, choices=["train", "imagenet"],
                   help="--data imagefolder: mean/std estimated on training images (default) or ImageNet's")
    p.add_argument("--data-workers", type=positive(int, zero=True), default=None, metavar="N",
                   help="--data imagefolder: DataLoader processes decoding images (default: half the "
                        "CPUs up to 4 on CUDA, none on the CPU)")


def device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda",
                   help="where teachers train and trials fine-tune (default auto: CUDA where there is a GPU); "
                        "lowering and latency timing stay on the CPU")

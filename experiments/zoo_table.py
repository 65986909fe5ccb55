"""The issue-11 zoo table: params and deployed latency of each zoo model under the sweep's rows.

For every model of ``tests/zoo/nets.py`` (one per architecture pattern of public model code,
plus torchvision-depth ShuffleNetV2), one Markdown row:

- params of the teacher, of "fp32 pruned 0.5" and of "int8 pruned 0.25" (and the drop);
- batch-1, one-thread latency of the fp32 teacher, uniform int8, fp32 pruned 0.5 and int8
  pruned 0.25, each deployed as a search trial deploys it: the same compress → PTQ prepare →
  lower → Inductor compile (``compile_checked``, with freezing, oneDNN int8 kernels) path, with
  the same fallback (int8 layers whose kernel does not compile left fp32, compiled again);
  timed by :func:`autoshrink.measure.latency.measure_latency` (warm-up, then the median of
  ``--runs`` calls, at least 50 for reported figures) and shown as ``median [p25–p75]`` ms,
  the package's spread rule;
- what was left alone and why: the dependency groups left unpruned (``unpruned_groups``, with
  their layers and reason) and the layers left fp32 (``fp32_layers``), as a trial reports them.

No fine-tuning: latency and params do not depend on the weights' values, so the teachers are
the zoo's random initialisations and int8 is plain post-training quantization, calibrated on a
few random batches (accuracy is not measured here; the sweep tests check that every row
completes and trains). Latency on a loaded machine is noise: run the whole table alone.

Usage (from the repository root)::

    python experiments/zoo_table.py                       # every model, 60 timed runs each
    python experiments/zoo_table.py --models gelu_mlp qkv_vit --runs 10   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from autoshrink import Candidate
from autoshrink.compress import compress
from autoshrink.compress.quantize import Int8CompileError, compile_checked, lower, prepare_ptq
from autoshrink.measure.latency import Latency, measure_latency

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo.nets import ZOO, ShuffleNetV2Deep, create  # noqa: E402  (the test zoo is not a package module)

X = torch.randn(1, 1, 32, 32)
ROWS = {  # the sweep's three candidates, and the teacher as deployed
    "teacher": Candidate(),
    "int8": Candidate.uniform(bits=8),
    "fp32 p0.5": Candidate.uniform(bits=32, prune=0.5),
    "int8 p0.25": Candidate.uniform(bits=8, prune=0.25),
}


def _model(name: str) -> tuple[nn.Module, str]:
    if name == "shufflenet_v2_deep":
        torch.manual_seed(0)
        return ShuffleNetV2Deep().eval(), "ShuffleNetV2 at torchvision's depth (4, 8, 4 blocks), x0.5 widths"
    return create(name), ZOO[name][1]


def deploy(model: nn.Module, candidate: Candidate, calib: list[torch.Tensor]):
    """Compress ``model`` by ``candidate`` and compile it as a search trial does.

    Returns:
        ``(compiled, params, unpruned_groups, fp32_layers)``.
    """
    comp = compress(model, candidate, X)
    for attempt in range(2):
        ptq = prepare_ptq(comp.pruned, Candidate(bits=comp.bits, default_bits=32), X, calib)
        comp.verify(ptq)
        try:
            compiled = compile_checked(lower(ptq), X)
            break
        except Int8CompileError as exc:
            if attempt or not exc.layers:
                raise
            comp.keep_fp32(exc.layers, f"int8 kernel did not compile ({exc.reason}); left fp32")
    params = sum(p.numel() for p in comp.pruned.parameters())
    return compiled, params, comp.prune_report.unpruned_groups, dict(comp.fp32_layers)


def _ms(lat: Latency) -> str:
    return f"{lat.median_ms:.3f} [{lat.p25_ms:.3f}–{lat.p75_ms:.3f}]"


def _left_alone(what: dict[str, tuple[list, dict]]) -> str:
    parts = []
    for row, (groups, fp32) in what.items():
        for layers, why in groups:
            parts.append(f"{row}: {', '.join(layers)} unpruned ({why.removeprefix('left unpruned: ')})")
        by_reason: dict[str, list[str]] = {}
        for layer, why in fp32.items():
            by_reason.setdefault(why, []).append(layer)
        for why, layers in by_reason.items():
            parts.append(f"{row}: {', '.join(layers)} fp32 ({why})")
    return "<br>".join(parts).replace("|", "\\|") or "nothing"


def table_row(name: str, runs: int, warmup: int, calib_batches: int) -> str:
    model, pattern = _model(name)
    torch.manual_seed(1)
    calib = [torch.randn(8, 1, 32, 32) for _ in range(calib_batches)]
    params: dict[str, int] = {}
    latency: dict[str, Latency] = {}
    left: dict[str, tuple[list, dict]] = {}
    for row, cand in ROWS.items():
        t0 = time.perf_counter()
        compiled, params[row], groups, fp32 = deploy(model, cand, calib)
        latency[row] = measure_latency(compiled, X, runs=runs, warmup=warmup, threads=1)
        if groups or fp32:
            left[row] = (groups, fp32)
        print(f"  {name} / {row}: {params[row]} params, {_ms(latency[row])} ms "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        del compiled
        torch._dynamo.reset()
    base = params["teacher"]

    def drop(row: str) -> str:
        return f"{params[row]} (−{100 * (1 - params[row] / base):.0f} %)"

    cells = [name, pattern.replace("|", "\\|"), str(base), drop("fp32 p0.5"), drop("int8 p0.25"),
             *(_ms(latency[r]) for r in ROWS), _left_alone(left)]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| model | pattern | params | params fp32 pruned 0.5 | params int8 pruned 0.25 | fp32 teacher ms | "
          "uniform int8 ms | fp32 pruned 0.5 ms | int8 pruned 0.25 ms | left alone, and why |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    names = [*ZOO, "shufflenet_v2_deep"]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=names, default=names, metavar="NAME",
                    help=f"zoo models to run (default: all of {', '.join(names)})")
    ap.add_argument("--runs", type=int, default=60, help="timed calls per latency (>= 50 for reported figures)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    ap.add_argument("--calib-batches", type=int, default=4, help="random batches of 8 for PTQ calibration")
    args = ap.parse_args(argv)
    from autoshrink import _env

    _env.configure()
    # library chatter on stderr between the progress lines (torch's pytree, Inductor's mkldnn lowering)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
    print(f"batch 1, 1 thread, Inductor, median [p25–p75] of {args.runs} runs after {args.warmup} warm-up; "
          f"torch {torch.__version__}\n")
    print(HEADER)
    for name in args.models:
        print(table_row(name, args.runs, args.warmup, args.calib_batches), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

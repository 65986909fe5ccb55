"""What the solver's latency-last solve saves: the same proposals, fewer latency-table entries.

The solver (:func:`autoshrink.search.solver.propose`) solves without the latency limit first and
times only its solutions' layers when they all meet it; otherwise it solves the whole problem,
timing every rule choice's layers. This runs ``propose`` twice on a public model built from a
Hugging Face config (transformers' ResNet, no download; random data: the drops are not the
point), each in a fresh process with its own empty cache (latency table, sensitivity, Inductor):
once as the search runs it, once with the whole problem forced. It prints the time, the table
entries timed and the proposals of each, which must be the same.

Usage:
    python experiments/bench_solver.py                 # latency 100 ms (does not bind), size 30 % of the teacher
    python experiments/bench_solver.py --budget-ms 0.5 # a latency limit that binds: both solve the whole problem
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def run(mode: str, budget_ms: float, size_fraction: float) -> dict:
    import torch
    import torch.nn as nn
    import transformers as T
    from torch.utils.data import TensorDataset

    import autoshrink as ash
    from autoshrink.measure.flops import model_cost
    from autoshrink.measure.predictor import LatencyPredictor
    from autoshrink.plan import check_space
    from autoshrink.search import solver

    class Logits(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(pixel_values=x).logits

    torch.manual_seed(0)
    cfg = T.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                         num_labels=10)
    model = Logits(T.ResNetForImageClassification(cfg).eval()).eval()
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    data = TensorDataset(x, y)
    task = ash.Task(model=model, train_data=data, val_data=data, example_input=x[:1], name="hf-resnet")
    space = check_space(model, x[:1], ash.SearchSpace.auto(model, x[:1]))
    budget = ash.Budget(latency_ms=budget_ms, size_mb=model_cost(model, x[:1], {}).size_mb * size_fraction)
    if mode == "whole":  # as before the latency-last solve: the whole problem, every choice timed
        latency_last = solver._solve_latency_last

        def whole(*args, **kwargs):
            problem, _, _, cached, _ = latency_last(*args, **kwargs)
            return problem, [], True, cached, {}

        solver._solve_latency_last = whole
    start = time.perf_counter()
    found = solver.propose(task, space, budget, limit=64)
    return {"mode": mode, "seconds": round(time.perf_counter() - start, 1),
            "entries": len(LatencyPredictor.for_machine().table), "latency_binds": found.latency_binds,
            "proposals": [s["choices"] for s in found.solutions], "warning": found.warning}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-ms", type=float, default=100.0)
    p.add_argument("--size-fraction", type=float, default=0.3, help="the size limit, as a fraction of the teacher's")
    p.add_argument("--child", choices=["latency-last", "whole"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args.budget_ms, args.size_fraction)))
        return
    rows = []
    for mode in ("latency-last", "whole"):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, AUTOSHRINK_CACHE=cache, TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
            env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # under AUTOSHRINK_CACHE: cold for each
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--budget-ms", str(args.budget_ms),
                                  "--size-fraction", str(args.size_fraction)], env=env, capture_output=True,
                                 text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in rows:
        print(f"{r['mode']:<13} {r['seconds']:6.1f} s  {r['entries']:3d} table entries  "
              f"latency_binds={r['latency_binds']}  {r['warning'] or ''}")
    same = rows[0]["proposals"] == rows[1]["proposals"]
    print(f"proposals the same: {same}")
    for choice in rows[0]["proposals"]:
        print(f"  {choice}")


if __name__ == "__main__":
    main()

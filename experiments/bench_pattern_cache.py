"""What torchao's rewrite-pattern exports cost a fresh process, with the disk cache cold and warm.

Every Ray worker, search driver and re-timing process starts with an empty memory, and its first
``prepare_qat`` + ``lower`` exports each of torchao's PT2E rewrite patterns
(:mod:`autoshrink.compress._patterns`). This runs that first ``prepare_qat`` + ``lower`` of a model
from the zoo in ``--processes`` fresh processes in turn, each against one cache folder that starts
empty: the first exports and saves every pattern, the others load them. Then the same again with
the disk cache off (``AUTOSHRINK_PATTERN_CACHE=0``, the behaviour before it), interleaved, so a
slow minute of the machine hits both. It prints each process's time, its exports and loads, and
the median of each kind; and it checks that the warm and the uncached processes lowered the same
graph and computed the same outputs on one batch.

Run it alone (two cores are easy to oversubscribe):
    python experiments/bench_pattern_cache.py                       # resnet20, 3 processes each
    python experiments/bench_pattern_cache.py --model mobilenetv2_32 --processes 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import hashlib, json, sys, time
import torch
from autoshrink import Candidate, models
from autoshrink.compress import compress, quantize

name, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = models.create(name, num_classes=10, in_chans=1).eval()
x = torch.randn(1, 1, 32, 32)
t0 = time.perf_counter()
student = compress(model, Candidate(default_bits=8), x).trainable(x)
lowered = quantize.lower(student)
seconds = time.perf_counter() - t0
import torchao.quantization.pt2e.utils as utils
cache = utils._get_aten_graph_module_for_pattern
with torch.no_grad():
    y = lowered(torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(1)))
json.dump({"seconds": seconds, "exports": getattr(cache, "exports", None), "loads": getattr(cache, "loads", None),
           "code": hashlib.sha256(lowered.code.encode()).hexdigest()[:16],
           "outputs": hashlib.sha256(y.numpy().tobytes()).hexdigest()[:16]}, open(out, "w"))
"""


def run_one(model: str, cache: Path, disk: bool) -> dict:
    env = {**os.environ, "AUTOSHRINK_CACHE": str(cache), "AUTOSHRINK_PATTERN_CACHE": "1" if disk else "0",
           "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        subprocess.run([sys.executable, "-c", _CHILD, model, out], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", help="a zoo model (autoshrink.models.list_models())")
    p.add_argument("--processes", type=int, default=3, help="fresh processes of each kind (default 3)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-patterns-") as tmp:
        cached_dir, uncached_dir = Path(tmp) / "cached", Path(tmp) / "uncached"
        rows = []
        for i in range(args.processes):
            for disk, folder in ((True, cached_dir), (False, uncached_dir)):
                r = run_one(args.model, folder, disk)
                kind = "uncached" if not disk else ("cold" if i == 0 else "warm")
                rows.append((kind, r))
                print(f"process {i + 1} {kind:8s} prepare_qat+lower {r['seconds']:6.2f} s  "
                      f"exports {r['exports']:3d}  loads {r['loads']:3d}  graph {r['code']}  outputs {r['outputs']}",
                      flush=True)
    by = {k: [r for kind, r in rows if kind == k] for k in ("cold", "warm", "uncached")}
    print()
    for k, rs in by.items():
        if rs:
            print(f"{k:8s} median {statistics.median(r['seconds'] for r in rs):6.2f} s over {len(rs)} process(es)")
    if by["warm"] and by["uncached"]:
        warm, unc = statistics.median(r["seconds"] for r in by["warm"]), statistics.median(
            r["seconds"] for r in by["uncached"])
        print(f"warm / uncached: {warm / unc:.2f}  (saves {unc - warm:.2f} s per fresh process)")
    same = {(r["code"], r["outputs"]) for _, r in rows}
    print("every process lowered the same graph with the same outputs" if len(same) == 1
          else f"DIFFERENT lowerings: {sorted(same)}")
    if len(same) != 1:
        sys.exit(1)


if __name__ == "__main__":
    main()

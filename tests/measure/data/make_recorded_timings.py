"""Make ``recorded_timings.json``: real (structure, measured latency) pairs and the table entries
they name, for ``tests/measure/test_calibration.py``.

N candidates of the bench's tiny ResNet-like CNN (``experiments/compare_search.py``'s ``tiny``
task and space: per-stage bits 4/8/32 and pruning) are sampled at random; each is measured as a
trial measures it (compressed, PTQ-lowered, compiled with Inductor, timed at batch 1 under the
machine lock: ``compare_search.measured_latency_ms``), and the per-layer table entries it names are
timed by :class:`LatencyPredictor` in a fresh table. The teacher is left untrained (latency does
not depend on the weights' values). The machine was shared and loaded when the
committed file was made: the figures are noisy, as a search's are.

Usage (from the repository root):
    PYTHONPATH=$PWD:$PWD/experiments python tests/measure/data/make_recorded_timings.py --n 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).with_name("recorded_timings.json")))
    args = p.parse_args()

    import optuna

    import autoshrink.tasks.digits as digits

    # latency does not depend on the weights' values: the bench's teacher is left untrained (and the
    # cache is a throw-away one, so that no untrained teacher is left where the bench would load it)
    os.environ["AUTOSHRINK_CACHE"] = tempfile.mkdtemp(prefix="recorded-timings-cache-")
    digits.train_teacher = lambda *a, **k: None
    from compare_search import measured_latency_ms, task_and_space

    from autoshrink.compress import compress
    from autoshrink.measure.predictor import LatencyPredictor
    from autoshrink.record import STUDY_DIRECTIONS

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task, space = task_and_space("tiny")
    study = optuna.create_study(directions=STUDY_DIRECTIONS, sampler=optuna.samplers.RandomSampler(seed=args.seed))
    pred = LatencyPredictor(Path(tempfile.mkdtemp()) / "table.json")  # a fresh table: every entry timed now
    examples = []
    start = time.time()
    for i in range(args.n):
        cand = space.sample(study.ask())
        comp = compress(task.model, cand, task.example_input)
        s = pred.structure(comp.pruned, comp.bits, task.example_input)
        raw = pred.predict_structure(s, calibrated=False)
        measured = measured_latency_ms(task, cand)
        examples.append({"structure": s.to_dict(), "measured_ms": measured})
        print(f"{i:2d} raw {raw:.3f} ms  measured {measured:.3f} ms  {len(s.layers)} layers "
              f"{s.transitions} transitions", flush=True)
    data = {
        "note": (f"{args.n} random candidates of the tiny bench CNN (experiments/compare_search.py, task 'tiny', "
                 f"seed {args.seed}), each measured as a trial measures it, with the per-layer table entries they "
                 f"name timed by LatencyPredictor; made by tests/measure/data/make_recorded_timings.py on "
                 f"{time.strftime('%Y-%m-%d')} on a shared, loaded {os.cpu_count()}-core machine "
                 f"({platform.machine()}), 1 thread, Inductor; load average {os.getloadavg()[0]:.1f}; "
                 f"{time.time() - start:.0f} s"),
        "table": dict(sorted(pred.table.items())),
        "examples": examples,
    }
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""A real search deployed in ONNX Runtime / OpenVINO: what ``best/`` ships runs in that runtime alone.

The issue's "done when": ``search(..., runtime=R)`` leaves R's artifact in ``best/``; loaded in a
fresh process with R alone (no torch, no autoshrink) and timed the same way (batch 1, one thread,
warm-up, median), it lands within the latency spread recorded for it and meets the budget, and
its predictions on the same validation set give the recorded int8 accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import autoshrink as ash
from autoshrink import runtimes
from autoshrink.record import State, StudyAttr

BUDGET_MS = 5.0

# the runtime alone: it loads the artifact as best/README.md says, times batch 1 as the search
# does (10 warm-up calls, the median of 60), scores the validation set, and proves that neither
# torch nor autoshrink was imported
_FRESH = r"""
import json, statistics, sys, time
import numpy as np
runtime, folder, val = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
x_val, y_val = val["x"], val["y"]
if runtime == "onnxruntime":
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(folder + "/model.onnx", so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    run = lambda a: session.run(None, {name: a})[0]
    version = ort.__version__
else:
    import openvino as ov
    model = ov.Core().compile_model(folder + "/model.xml", "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                    "INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    request = model.create_infer_request()
    run = lambda a: request.infer({0: a})[0]
    version = ov.get_version()
x1 = np.ascontiguousarray(x_val[:1], dtype=np.float32)
run(x1)
for _ in range(10):
    run(x1)
times = []
for _ in range(60):
    t0 = time.perf_counter()
    run(x1)
    times.append((time.perf_counter() - t0) * 1e3)
correct = 0
for i in range(0, len(x_val), 256):
    correct += int((np.asarray(run(np.ascontiguousarray(x_val[i:i + 256], dtype=np.float32))).argmax(-1)
                    == y_val[i:i + 256]).sum())
print(json.dumps({"median_ms": statistics.median(times), "accuracy": 100.0 * correct / len(x_val),
                  "version": version, "torch": "torch" in sys.modules, "autoshrink": "autoshrink" in sys.modules}))
"""


def _fresh(name, folder, x, y, tmp_path) -> dict:
    np.savez(tmp_path / "val.npz", x=x, y=y)
    proc = subprocess.run([sys.executable, "-c", _FRESH, name, str(folder), str(tmp_path / "val.npz")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not fresh["torch"] and not fresh["autoshrink"]  # the runtime alone
    return fresh


def _within_recorded_spread(fresh_ms: float, recorded_ms: float, iqr_ms: float) -> bool:
    """The gate's median +- 2 IQR, plus a noise floor of 50 % of the median (a 2-core machine shared
    with other jobs moves sub-millisecond medians that much) and 0.05 ms: these test models run in
    13-100 us, and on an AVX2-only EPYC a fresh process timed them 8-50 us slower than the process
    that recorded them (0.021 vs 0.013 ms, 0.114 vs 0.063 ms) with nothing else running."""
    return abs(fresh_ms - recorded_ms) <= 2 * iqr_ms + 0.5 * recorded_ms + 0.05


# one runtime end to end (a search with Ray takes ~4 min on a loaded 2-core machine); OpenVINO gets
# the same checks on one trial's artifact below, in seconds. On the suite's shared Ray: what ships
# and how it runs alone is checked here, not how a search starts its own Ray (test_multifile does)
@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
@pytest.mark.parametrize("name", ["onnxruntime"])
def test_best_model_runs_in_that_runtime_alone_as_recorded(tiny_task, tiny_space, tmp_path, name):
    if name not in runtimes.available():
        pytest.skip(f"{name} is not installed")
    out = tmp_path / "run"
    result = ash.search(tiny_task, tiny_space, ash.Budget(latency_ms=BUDGET_MS), trials=3, workers=1, out=out,
                        seed=0, progress=False, latency_runs=20, early_stopping=False, runtime=name)
    df = result.trials
    assert (df["state"] == State.FAIL).sum() == 0, df["error"].tolist()
    version = runtimes.get(name).version()
    timed = df[df["latency_ms"].notna()]
    assert (timed["runtime"] == name).all() and (timed["runtime_version"] == version).all()
    assert result.meta[StudyAttr.RUNTIME] == name
    assert result.teacher["runtime"] == name and result.teacher["runtime_version"] == version
    best = result.best
    assert best is not None, df.to_string()
    rt = runtimes.get(name)
    folder = out / "best"
    assert (folder / rt.artifact).is_file() and (folder / "model.pt2").is_file()
    assert f"## In {name}" in (folder / "README.md").read_text()
    assert name in (out / "report.md").read_text()

    xv, yv = tiny_task.val_data.tensors
    fresh = _fresh(name, folder, xv.numpy(), yv.numpy(), tmp_path)
    assert fresh["version"] == best["runtime_version"]
    # the same predictions on the same validation set (one sample of slack for a tie in float logits)
    assert abs(fresh["accuracy"] - best["accuracy"]) <= 100.0 / len(yv) + 1e-9, (fresh, best["accuracy"])
    recorded, iqr = float(best["latency_ms"]), float(best["latency_iqr_ms"])
    assert _within_recorded_spread(fresh["median_ms"], recorded, iqr), (fresh["median_ms"], recorded, iqr)
    assert fresh["median_ms"] <= BUDGET_MS
    # experiments/check_runtime_export.py, the done-when check, passes on it too (against the re-timing
    # of the shipped model.onnx, with the noise floor above); its OpenVINO twin is in test_check_runtime_export
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_runtime_export", Path(__file__).resolve().parents[2]
                                                  / "experiments" / "check_runtime_export.py")
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    np.savez(tmp_path / "val.npz", x=xv.numpy(), y=yv.numpy())
    assert best["latency_source"] == "deployed"
    # a sub-millisecond median timed in two fresh processes minutes apart: stop 21's CI saw one land
    # past the band on a shared 2-core machine, so the band gets up to 3 tries (the others must pass),
    # and 0.05 ms more (see _within_recorded_spread)
    report = tmp_path / "check.json"
    code = checker.main([str(out), "--val-npz", str(tmp_path / "val.npz"), "--slack", "0.5", "--slack-ms", "0.05",
                         "--tries", "3", "--json", str(report)])
    got = json.loads(report.read_text())
    assert code == 0, json.dumps({k: got[k] for k in ("checks", "load", "tries_median_ms")}, indent=1)


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_a_trial_artifact_runs_in_that_runtime_alone_as_recorded(tmp_path, monkeypatch, name):
    """The same checks on one real trial (gate, KD fine-tune, evaluation, artifact), without a search."""
    import torch
    import torch.nn as nn
    from torch.utils.data import TensorDataset

    from autoshrink import Candidate, Task
    from autoshrink.trial import TrialContext, evaluate

    if name not in runtimes.available():
        pytest.skip(f"{name} is not installed")
    monkeypatch.setenv("AUTOSHRINK_LOCK_DIR", str(tmp_path / "locks"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    data = TensorDataset(torch.randn(96, 1, 8, 8), torch.randint(0, 4, (96,)))
    task = Task(model=model, train_data=data, val_data=data, example_input=data[0][0].unsqueeze(0))
    folder = tmp_path / "trial"
    r = evaluate(task, Candidate.uniform(bits=8, steps=4, batch_size=16), ash.Budget(latency_ms=BUDGET_MS),
                 TrialContext(runtime=name, latency_runs=60, artifact_dir=str(folder)))
    assert r.meets_budget and r.runtime == name
    x, y = data.tensors
    fresh = _fresh(name, folder, x.numpy(), y.numpy(), tmp_path)
    assert fresh["version"] == r.runtime_version
    assert abs(fresh["accuracy"] - r.accuracy) <= 100.0 / len(y) + 1e-9, (fresh, r.accuracy)
    assert _within_recorded_spread(fresh["median_ms"], r.latency_ms, r.latency_iqr_ms), (fresh, r.latency_ms)
    assert fresh["median_ms"] <= BUDGET_MS

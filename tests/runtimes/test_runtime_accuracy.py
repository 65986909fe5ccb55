"""A real (briefly trained) CNN at int8: the accuracy each runtime gives is the accuracy the
search records (Inductor's), and the Inductor README snippet runs as written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from autoshrink import Candidate, runtimes
from autoshrink.compress import compress
from autoshrink.compress.quantize import compile_cpu, lower, prepare_ptq


@pytest.fixture(scope="module")
def int8(tiny_task):
    x = tiny_task.example_input
    cand = Candidate(bits={"layer1.*": 4}, default_bits=8)  # 4-bit weights travel as int8 in [-8, 7]
    comp = compress(tiny_task.model, cand, x)
    return lower(prepare_ptq(comp.pruned, Candidate(bits=comp.bits, default_bits=32), x,
                             list(tiny_task.calibration_batches())))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ("onnxruntime", "openvino") if n in runtimes.available()])
def test_runtime_accuracy_is_the_recorded_int8_accuracy(tiny_task, int8, name):
    import copy

    recorded, _ = tiny_task.evaluate(compile_cpu(copy.deepcopy(int8)), fixed_batch=True)
    dep = runtimes.get(name).build(copy.deepcopy(int8), tiny_task.example_input)
    acc, se = runtimes.evaluate(dep, tiny_task.loader("val", 256, shuffle=False))
    assert acc > 50  # a real model
    assert acc == pytest.approx(recorded, abs=1.0), (acc, recorded)
    # the same through Task.evaluate (a deployable takes tensors too)
    assert tiny_task.evaluate(dep)[0] == pytest.approx(acc, abs=1e-4)
    kernels = dep.kernels()
    assert "conv1" in kernels and kernels["conv1"] == "int8", kernels


@pytest.mark.slow
def test_inductor_snippet_runs_in_a_fresh_process(tiny_task, int8, tmp_path):
    import copy

    rt = runtimes.get("inductor")
    dep = rt.build(copy.deepcopy(int8), tiny_task.example_input)
    rt.save(dep, tmp_path / "best")
    x = tiny_task.val_data.tensors[0][:8]
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys\n" + "x = __import__('torch').load(sys.argv[1])\n"
              + runtimes.usage_snippet("inductor", tmp_path / "best")
              + "torch.save(logits, sys.argv[2])\nassert 'autoshrink' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "y.pt")
    assert (got.argmax(1) == dep(x).argmax(1)).float().mean() >= 0.99

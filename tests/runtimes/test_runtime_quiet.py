"""Building in ONNX Runtime / OpenVINO says nothing on the console once ``_env.quiet()`` ran (as the
command line and experiments/compare_runtimes.py run it): the ONNX exporter's notices about
torchvision's ops ("torchvision is not installed. Skipping torchvision::nms"), printed on every
export, are not the user's to act on. In a subprocess: torch's log handler holds the stderr it found
at import, which pytest's capture does not see."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoshrink import runtimes

_BUILD = """
import torch
from autoshrink import _env, runtimes
_env.quiet()
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
runtimes.get("onnxruntime").build(model, torch.randn(1, 1, 4, 4))
print("built")
"""


@pytest.mark.skipif("onnxruntime" not in runtimes.available(), reason="onnxruntime is not installed")
def test_a_build_prints_no_exporter_notices_when_quiet():
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", _BUILD], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "built" in proc.stdout, proc.stderr[-2000:]
    assert "torchvision" not in proc.stderr and "Skipping" not in proc.stderr, proc.stderr[-2000:]

"""Runtime selection, the missing-extra error, and the timing/evaluation rules (no model build)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from autoshrink import runtimes
from autoshrink.runtimes import Deployable, MissingRuntimeError, RuntimeInfo, RuntimeLatency


class _Linear(Deployable):
    """A numpy deployable that counts its calls: what time_runtime and evaluate must run."""

    def __init__(self, weight: np.ndarray, threads: int = 1) -> None:
        super().__init__(RuntimeInfo("onnxruntime", "test", threads), [])
        self.weight = weight
        self.calls = 0

    def run(self, x):
        self.calls += 1
        return x.reshape(len(x), -1) @ self.weight


def test_registry_lists_the_three_runtimes():
    assert runtimes.list_runtimes() == ["inductor", "onnxruntime", "openvino"]
    assert runtimes.DEFAULT == "inductor"


@pytest.mark.parametrize("name", runtimes.list_runtimes())
def test_get_returns_that_runtime(name):
    if name not in runtimes.available():
        pytest.skip(f"{name} is not installed")
    rt = runtimes.get(name)
    assert rt.name == name and rt.version() and rt.artifact
    assert rt.artifact in rt.usage_snippet("best")


def test_unknown_runtime_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown runtime 'onnx'.*'inductor', 'onnxruntime', 'openvino'.*"
                                         r"Did you mean 'onnxruntime'"):
        runtimes.get("onnx")


@pytest.mark.parametrize(("name", "module"), [("onnxruntime", "onnxruntime"), ("onnxruntime", "onnxscript"),
                                              ("openvino", "openvino"), ("openvino", "onnx")])
def test_missing_extra_is_one_line_with_the_install_command(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingRuntimeError) as info:
        runtimes.get(name)
    message = str(info.value)
    assert "\n" not in message
    assert f"'{module}'" in message and f'pip install "autoshrink[{name}]"' in message
    assert name not in runtimes.available()
    assert isinstance(info.value, ImportError)


def test_inductor_needs_no_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert runtimes.available() == ["inductor"]


def test_runtime_info_columns():
    assert RuntimeInfo("openvino", "2024.6", 2).columns() == {
        "runtime": "openvino", "runtime_version": "2024.6", "latency_threads": 2}


def test_time_runtime_calls_the_deployable_and_records_its_runtime():
    dep = _Linear(np.ones((4, 2), np.float32))
    lat = runtimes.time_runtime(dep, torch.randn(3, 4), runs=7, warmup=2)
    assert isinstance(lat, RuntimeLatency) and lat.runs == 7 and lat.threads == 1
    assert lat.info == RuntimeInfo("onnxruntime", "test", 1)
    assert dep.calls == 1 + 2 + 7  # first call, warm-up, timed runs: all in the runtime
    assert 0 < lat.p25_ms <= lat.median_ms <= lat.p75_ms


def test_time_runtime_refuses_another_thread_count():
    with pytest.raises(ValueError, match=r"runs with 1 thread\(s\), not 4: build or load it with threads=4"):
        runtimes.time_runtime(_Linear(np.ones((4, 2), np.float32)), torch.randn(1, 4), runs=3, threads=4)


def test_evaluate_scores_numpy_outputs_and_drops_padding():
    dep = _Linear(np.eye(3, dtype=np.float32))
    x = torch.eye(3)[[0, 1, 2, 0, 1]]
    y = torch.tensor([0, 1, 2, 1, 1])  # 4 of 5 right
    acc, se = runtimes.evaluate(dep, [(x[:4], y[:4]), (x[4:], y[4:])], pad_to=4)
    assert acc == pytest.approx(80.0)
    assert se == pytest.approx(100 * (0.8 * 0.2 / 5) ** 0.5)
    with pytest.raises(ValueError, match="at least one batch"):
        runtimes.evaluate(dep, [])


def test_deployable_takes_tensors_too():
    dep = _Linear(np.eye(2, dtype=np.float32))
    out = dep(torch.tensor([[1.0, 2.0]]))
    assert isinstance(out, torch.Tensor) and out.tolist() == [[1.0, 2.0]]
    assert isinstance(dep(np.array([[1.0, 2.0]])), np.ndarray)


@pytest.mark.parametrize("name", runtimes.list_runtimes())
def test_load_from_a_folder_without_the_artifact(name, tmp_path):
    if name not in runtimes.available():
        pytest.skip(f"{name} is not installed")
    rt = runtimes.get(name)
    with pytest.raises(FileNotFoundError, match=rf"{rt.artifact}: no {name} model here"):
        rt.load(tmp_path)
    with pytest.raises(ValueError, match="threads must be an integer >= 1, got 0"):
        rt.load(tmp_path, threads=0)

"""Each runtime on a tiny int8 CNN and MLP lowered by the project's own path: outputs match the
lowered model, int8 kernels really run, the artifact saves, reloads, and runs in a fresh process
with that runtime alone, and timing is the runtime's own."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from autoshrink import Candidate, runtimes
from autoshrink.compress import compress
from autoshrink.compress.quantize import lower, prepare_ptq

EXTERNAL = [name for name in ("onnxruntime", "openvino") if name in runtimes.available()]
ALL = ["inductor", *EXTERNAL]


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


MODELS = {"cnn": _cnn, "mlp": _mlp}
QUANTIZED = {"cnn": {"0", "3", "7"}, "mlp": {"1", "3"}}  # the conv/linear layers, by module name


def _lowered(kind: str, bits: int):
    """A seeded tiny model, int8 (or fp32) through compress -> PTQ -> lower, with its inputs."""
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    x = torch.randn(64, 1, 8, 8)
    comp = compress(model, Candidate.uniform(bits=bits), x[:1])
    lowered = lower(prepare_ptq(comp.pruned, Candidate(bits=comp.bits, default_bits=32), x[:1], [x]))
    with torch.no_grad():
        reference = lowered(x).numpy()
    return lowered, x, reference


@pytest.fixture(scope="module", params=[(k, b) for k in MODELS for b in (8, 32)], ids=lambda p: f"{p[0]}-{p[1]}bit")
def lowered(request):
    return (*request.param, *_lowered(*request.param))


@pytest.fixture(scope="module")
def built():
    """One deployable per (runtime, model, bits) for the whole module: building is the slow part."""
    cache: dict[tuple, object] = {}

    def get(name, lowered):
        kind, bits, model, x, _ = lowered
        if (name, kind, bits) not in cache:
            cache[name, kind, bits] = runtimes.get(name).build(model, x[:1])
        return cache[name, kind, bits]

    return get


def _close(got: np.ndarray, reference: np.ndarray, bits: int) -> None:
    # a runtime may round a value at a quantize step the other way than PyTorch does: allow a
    # few steps of int8 error in int8 models, float noise in fp32 ones
    scale = float(np.abs(reference).max())
    tol = 0.03 * scale if bits == 8 else 1e-4 * scale + 1e-5
    assert float(np.abs(got - reference).max()) <= tol
    assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("name", ALL)
def test_round_trip_matches_the_lowered_model(name, lowered, built, tmp_path):
    kind, bits, model, x, reference = lowered
    rt = runtimes.get(name)
    dep = built(name, lowered)
    got = dep(x.numpy())
    assert isinstance(got, np.ndarray) and got.shape == reference.shape
    _close(got, reference, bits)

    written = rt.save(dep, tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in dep.files)
    assert (tmp_path / rt.artifact).is_file()
    again = rt.load(tmp_path)
    np.testing.assert_allclose(again(x.numpy()), got, rtol=0, atol=1e-6)
    assert again.info.runtime == name and again.info.version == rt.version()


@pytest.mark.parametrize("name", EXTERNAL)
def test_int8_kernels_really_run(name, lowered, built):
    kind, bits, model, x, _ = lowered
    dep = built(name, lowered)
    kernels = dep.kernels()
    assert set(kernels) == QUANTIZED[kind], kernels  # every conv/linear found, by its layer name
    if bits == 32:
        assert set(kernels.values()) == {"fp32"}
    elif name == "openvino":
        assert set(kernels.values()) == {"int8"}  # OpenVINO runs every QDQ conv/linear in u8/i8
    else:
        # ONNX Runtime fuses a layer into an int8 kernel (QLinearConv / QGemm) only when its output
        # is re-quantized; the PT2E x86 graph leaves the last conv (before pooling) and the
        # classifier's output in float, so those run as float kernels on dequantized weights
        first = min(QUANTIZED[kind], key=int)
        assert kernels[first] == "int8", kernels
        assert kernels["3"] == "fp32", kernels  # cnn: the conv before pooling; mlp: the classifier


@pytest.mark.parametrize("name", EXTERNAL)
def test_layers_a_runtime_leaves_in_float_are_named(name, lowered, built):
    kind, bits, _, _, _ = lowered
    if bits != 8:
        pytest.skip("only quantized layers can fall back")
    plan = dict.fromkeys(QUANTIZED[kind], 8)
    fallen = runtimes.fp32_in_runtime(built(name, lowered), plan)
    if name == "openvino":
        assert fallen == {}
    else:
        assert set(fallen) == ({"3", "7"} if kind == "cnn" else {"3"})
        assert all("onnxruntime" in why and "float kernel" in why for why in fallen.values())


def test_onnxruntime_optimized_graph_holds_integer_kernels(lowered, built, tmp_path):
    # the session as timed (all optimisations, layout included), not the one kernels() inspects
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from autoshrink.runtimes.onnxruntime import INT8_KERNELS, session_options

    dep = built("onnxruntime", lowered)
    bits = lowered[1]

    opt = tmp_path / "optimized.onnx"
    ort.InferenceSession(str(dep.files[0]), session_options(1, opt), providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(opt)).graph.node}
    assert bool(ops & INT8_KERNELS) == (bits == 8), ops


class _Counting:
    """Wraps a runtime object and counts calls to one method."""

    def __init__(self, inner, method: str) -> None:
        self._inner, self._method, self.calls = inner, method, 0

    def __getattr__(self, attr):
        value = getattr(self._inner, attr)
        if attr != self._method:
            return value

        def counted(*args, **kwargs):
            self.calls += 1
            return value(*args, **kwargs)

        return counted


@pytest.mark.parametrize("name", EXTERNAL)
def test_timing_runs_in_that_runtime(name):
    model, x, _ = _lowered("cnn", 8)
    rt = runtimes.get(name)
    dep = rt.build(model, x[:1])
    if name == "onnxruntime":
        dep.session = _Counting(dep.session, "run")
        counter = dep.session
    else:
        dep._request = _Counting(dep._request, "infer")
        counter = dep._request
    lat = runtimes.time_runtime(dep, x, runs=12, warmup=3)
    assert counter.calls == 1 + 3 + 12  # the runtime's own session/request did every call
    assert lat.info.runtime == name and lat.info.version == rt.version() and lat.info.threads == 1
    assert lat.info.columns()["runtime_version"] == rt.version()
    assert lat.runs == 12 and 0 < lat.median_ms


# After the README snippet: run the model on the inputs in argv[1], save logits to argv[2], and
# prove that neither torch nor autoshrink was imported.
_TAIL = {
    "onnxruntime": "logits = session.run(None, {inp.name: np.load(sys.argv[1])})[0]\n",
    "openvino": "logits = model(np.load(sys.argv[1]))[0]\n",
}


@pytest.mark.parametrize("name", EXTERNAL)
def test_saved_artifact_runs_with_that_runtime_alone(name, lowered, built, tmp_path):
    kind, bits, model, x, _ = lowered
    if bits != 8:
        pytest.skip("the int8 models are the point")
    rt = runtimes.get(name)
    dep = built(name, lowered)
    folder = tmp_path / "best"
    rt.save(dep, folder)
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys\n" + runtimes.usage_snippet(name, folder) + _TAIL[name]
        + "np.save(sys.argv[2], logits)\n"
        + "assert not {'torch', 'autoshrink'} & set(sys.modules), sorted(sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), dep(x.numpy()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_time_lowered_builds_and_times_in_the_runtime_asked(name, tmp_path):
    from autoshrink.measure.latency import MachineLock

    model, x, _ = _lowered("mlp", 8)
    lat = runtimes.time_lowered(name, model, x[:1], runs=5, warmup=1, lock=MachineLock(tmp_path))
    assert lat.info == runtimes.get(name).info(1) and lat.runs == 5 and lat.median_ms > 0

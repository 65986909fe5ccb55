"""The runtime a search asks for is the one that times, evaluates and ships each trial (issue 14).

A small untrained CNN on random data: the gate and the fine-tune run for real (export, ONNX
conversion, the runtime's session), in seconds. Spies prove which runtime was called.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import autoshrink as ash
from autoshrink import Candidate, Task, runtimes
from autoshrink import trial as trial_mod
from autoshrink.runtimes import MissingRuntimeError, RuntimeLatency

OTHER = [n for n in ("onnxruntime", "openvino") if n in runtimes.available()]
pytestmark = pytest.mark.skipif(not OTHER, reason="neither onnxruntime nor openvino is installed")


@pytest.fixture(autouse=True)
def _lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSHRINK_LOCK_DIR", str(tmp_path / "locks"))


def _task() -> Task:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    data = TensorDataset(torch.randn(96, 1, 8, 8), torch.randint(0, 4, (96,)))
    return Task(model=model, train_data=data, val_data=data, example_input=data[0][0].unsqueeze(0), name="small")


def _deployable_class(name: str):
    if name == "onnxruntime":
        from autoshrink.runtimes.onnxruntime import OrtDeployable

        return OrtDeployable
    from autoshrink.runtimes.openvino import OpenVinoDeployable

    return OpenVinoDeployable


def _no_inductor(monkeypatch):
    """Fail the test if the trial compiles or times anything with Inductor."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("Inductor was used although another runtime was asked for")

    monkeypatch.setattr(trial_mod, "compile_checked", refuse)
    monkeypatch.setattr(trial_mod, "compile_cpu", refuse)
    monkeypatch.setattr(trial_mod, "measure_latency", refuse)


@pytest.mark.parametrize("name", OTHER)
def test_the_gate_runs_in_the_runtime_asked_for(monkeypatch, name):
    _no_inductor(monkeypatch)
    cls = _deployable_class(name)
    calls = []
    real_run = cls.run

    def spy(self, x):
        calls.append((self.info.runtime, x.shape))
        return real_run(self, x)

    monkeypatch.setattr(cls, "run", spy)
    ctx = trial_mod.TrialContext(runtime=name, latency_runs=7)
    r = trial_mod.evaluate(_task(), Candidate.uniform(bits=8), ash.Budget(latency_ms=1e-9), ctx)
    assert r.meets_budget is False and r.latency_ms > 0  # timed, then rejected: never fine-tuned
    assert r.runtime == name and r.runtime_version == runtimes.get(name).version() and r.latency_threads == 1
    # the first call, 10 warm-up calls, then the 7 timed ones: all of them that runtime's session, at batch 1
    assert len(calls) == 1 + 10 + 7 and all(c == (name, (1, 1, 8, 8)) for c in calls)
    metrics = r.metrics()
    assert (metrics["runtime"], metrics["runtime_version"], metrics["latency_threads"]) == (name, r.runtime_version, 1)


def test_inductor_stays_the_default(monkeypatch):
    assert trial_mod.TrialContext().runtime == "inductor" == runtimes.DEFAULT
    compiled = []

    def compile_checked(lowered, x):  # no real compilation: the test is about which path ran
        compiled.append(type(lowered).__name__)
        return lowered

    monkeypatch.setattr(trial_mod, "compile_checked", compile_checked)
    r = trial_mod.evaluate(_task(), Candidate.uniform(bits=8), ash.Budget(latency_ms=1e-9),
                           trial_mod.TrialContext(latency_runs=3))
    assert compiled == ["GraphModule"]
    assert (r.runtime, r.runtime_version, r.latency_threads) == ("inductor", torch.__version__, 1)
    assert r.runtime_fp32_layers == {}


@pytest.mark.parametrize("name", OTHER)
def test_the_fine_tuned_model_is_evaluated_and_saved_in_that_runtime(tmp_path, monkeypatch, name):
    _no_inductor(monkeypatch)
    task = _task()
    cand = Candidate.uniform(bits=8, steps=4, batch_size=16)
    r = trial_mod.evaluate(task, cand, ash.Budget(latency_ms=1e4),
                           trial_mod.TrialContext(runtime=name, latency_runs=3, artifact_dir=str(tmp_path)))
    assert r.meets_budget and r.accuracy is not None
    rt = runtimes.get(name)
    assert (tmp_path / "model.pt2").is_file() and (tmp_path / rt.artifact).is_file()
    # the saved artifact, opened by the runtime alone, scores what the trial recorded
    acc, _ = runtimes.evaluate(rt.load(tmp_path), task.loader("val", 256, shuffle=False))
    assert acc == pytest.approx(r.accuracy)
    assert set(r.runtime_fp32_layers) <= {"0", "2", "6"}
    if name == "onnxruntime":
        # the PT2E x86 graph leaves the classifier's output in float: ONNX Runtime runs it with a
        # float kernel on dequantized weights (OpenVINO's own transformations keep it int8)
        assert "6" in r.runtime_fp32_layers and name in r.runtime_fp32_layers["6"]


def test_an_onnx_conversion_failure_is_a_failed_trial_with_its_reason(monkeypatch):
    if "onnxruntime" not in OTHER:
        pytest.skip("onnxruntime is not installed")
    from autoshrink import _worker
    from autoshrink.export import ExportError
    from autoshrink.runtimes import onnxruntime as ort_rt

    def refuse(*_args, **_kwargs):
        raise ExportError("cannot convert to ONNX: node 'quantize_x' is choose_qparams, which has no exact "
                          "ONNX equivalent")

    monkeypatch.setattr(ort_rt, "export_onnx", refuse)
    out = _worker.run_trial(_task(), Candidate.uniform(bits=8).to_dict(), {"latency_ms": 5.0},
                            {"runtime": "onnxruntime", "latency_runs": 3})
    assert out["state"] == "FAIL" and out["runtime"] == "onnxruntime"  # noqa: PLR2004
    assert out["error"].startswith("ExportError: cannot convert to ONNX: node 'quantize_x'")


@pytest.mark.parametrize("name", OTHER)
def test_the_latency_meter_times_in_the_runtime_asked_for(name):
    from autoshrink.compress import compress
    from autoshrink.compress.quantize import lower, prepare_ptq
    from autoshrink.measure.latency import LatencyMeter, program_bytes

    task = _task()
    x = task.example_input
    comp = compress(task.model, Candidate.uniform(bits=8), x)
    lowered = lower(prepare_ptq(comp.pruned, Candidate(bits=comp.bits, default_bits=32), x,
                                list(task.calibration_batches())))
    lat = LatencyMeter().measure(program_bytes(lowered, x, dynamic_batch=True), x, runs=5, threads=1, runtime=name)
    assert isinstance(lat, RuntimeLatency) and lat.info.runtime == name and lat.median_ms > 0


@pytest.mark.parametrize("name", OTHER)
def test_the_plan_times_in_that_runtime_and_lists_its_float_layers(name):
    from autoshrink.plan import plan

    task = _task()
    p = plan(task, "auto", runtime=name, latency_runs=3)
    assert p.cheapest_error == "" and p.cheapest_cost["latency_ms"] > 0
    if name == "onnxruntime":  # the classifier (output not requantized); OpenVINO keeps it int8
        assert "float kernel" in p.fp32["6"] and name in p.fp32["6"], p.fp32


# -- selection, and the missing extra, through search(), sweep() and the command line -----------------
def test_search_refuses_an_unknown_or_missing_runtime_before_any_work(tmp_path, monkeypatch):
    task = _task()
    with pytest.raises(ValueError, match="unknown runtime 'onnx'.*Did you mean 'onnxruntime'"):
        ash.search(task, "auto", ash.Budget(latency_ms=5), trials=1, out=tmp_path / "a", runtime="onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(MissingRuntimeError, match=r'pip install "autoshrink\[onnxruntime\]"'):
        ash.search(task, "auto", ash.Budget(latency_ms=5), trials=1, out=tmp_path / "b", runtime="onnxruntime")
    with pytest.raises(MissingRuntimeError, match=r'pip install "autoshrink\[onnxruntime\]"'):
        ash.sweep(task, [Candidate.uniform(bits=8)], out=tmp_path / "c", runtime="onnxruntime")
    assert not any((tmp_path / d).exists() for d in "abc")  # no run folder: nothing started


def test_search_passes_the_runtime_to_every_trial(tmp_path, monkeypatch):
    search_pkg = sys.modules["autoshrink.search"]  # the package (the name `autoshrink.search` is the function)

    seen = {}

    def fake_run(task, space, budget, config, sampler_obj, load, **_kw):
        seen["config"] = config
        return "result"

    monkeypatch.setattr(search_pkg, "_run", fake_run)
    name = OTHER[0]
    assert ash.search(_task(), "auto", ash.Budget(latency_ms=5), trials=1, out=tmp_path / "r", runtime=name) == "result"
    config = seen["config"]
    assert config.runtime == name and config.settings.runtime == name
    from autoshrink.search.preflight import timing_context

    assert timing_context(config.settings).runtime == name  # the driver's own budget checks too


def test_cli_runtime_flag(monkeypatch, capsys):
    from autoshrink import cli

    assert cli.main(["search", "--budget-ms", "5", "--runtime", "tensorrt"]) == cli.EXIT_USAGE
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err

    def no_task(*_args, **_kwargs):
        raise AssertionError("the task was built before the runtime was checked")

    monkeypatch.setattr(cli, "_plan_subject", no_task)
    monkeypatch.setattr(cli, "_build_task", no_task)
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert cli.main(["search", "--budget-ms", "5", "--runtime", "openvino"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("autoshrink: error: the openvino runtime needs")
    assert 'pip install "autoshrink[openvino]"' in err


def test_cli_search_hands_the_runtime_to_search(monkeypatch):
    from autoshrink import cli

    got = {}

    class Stop(Exception):
        pass

    def fake_search(task, space, budget, **kwargs):
        got.update(kwargs)
        raise Stop

    monkeypatch.setattr(ash, "search", fake_search)
    monkeypatch.setattr(cli, "_build_task", lambda args: _task())
    # Stop is not an autoshrink error: the CLI reports it as an internal one (exit 1)
    assert cli.main(["search", "--budget-ms", "5", "--runtime", OTHER[0], "--space", "auto"]) == 1
    assert got["runtime"] == OTHER[0]


def test_the_export_ships_the_runtime_artifact_with_how_to_run_it(tmp_path):
    import pandas as pd

    from autoshrink.result import SearchResult

    name = OTHER[0]
    rt = runtimes.get(name)
    trial_dir = tmp_path / "trials" / "0000"
    trial_dir.mkdir(parents=True)
    (trial_dir / "model.pt2").write_bytes(b"pt2")
    for f in ("model.onnx",) if name == "onnxruntime" else ("model.xml", "model.bin"):
        (trial_dir / f).write_bytes(f.encode())
    (trial_dir / "candidate.json").write_text(Candidate.uniform(bits=8).to_json())
    trials = pd.DataFrame([{"number": 0, "state": "COMPLETE", "accuracy": 90.0, "latency_ms": 1.0,
                            "meets_budget": True, "runtime": name, "runtime_version": rt.version(),
                            "latency_threads": 2}])
    dest = SearchResult(out=tmp_path, trials=trials).export(0, tmp_path / "best")
    assert (dest / rt.artifact).read_bytes() == (trial_dir / rt.artifact).read_bytes()
    readme = (dest / "README.md").read_text()
    assert f"## In {name}" in readme and rt.usage_snippet(".", 2) in readme
    assert np.all([line in readme for line in rt.usage_snippet(".", 2).splitlines()])


def test_a_study_timed_in_one_runtime_is_not_resumed_in_another(tmp_path):
    from autoshrink.record import StudyAttr
    from autoshrink.search import Driver, DriverConfig, SearchError

    class _Study:
        user_attrs = {StudyAttr.RUNTIME: "openvino"}

    driver = Driver(task=None, space=None, study=_Study(), config=DriverConfig(budget=ash.Budget(), out=tmp_path))
    with pytest.raises(SearchError, match=r"timed in openvino, not inductor: resume it with runtime='openvino'"):
        driver.record_meta()

"""experiments/check_runtime_export.py: the verdicts of the done-when check (fast, from made-up
figures), and the check itself on a real OpenVINO search (slow: one trial), whose best/ it loads in
a fresh process with OpenVINO alone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "check_runtime_export.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_runtime_export", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(**trial):
    base = {"runtime": "onnxruntime", "runtime_version": "1.2.3", "latency_threads": 1, "latency_ms": 2.0,
            "latency_iqr_ms": 0.2, "accuracy": 90.0}
    return {"trial": base | trial, "budget": {"latency_ms": 5.0}}


def _fresh(**kw):
    return {"median_ms": 2.05, "p25_ms": 2.0, "p75_ms": 2.1, "runs": 60, "accuracy": 90.0, "n_val": 400,
            "version": "1.2.3", "threads": 1, "torch_imported": False, "autoshrink_imported": False} | kw


def _verdicts(metrics, fresh, **kw):
    return {what: ok for what, _, _, ok in _checker().judge(metrics, fresh, "onnxruntime", **kw)}


def test_every_check_passes_on_the_recorded_figures():
    assert all(_verdicts(_metrics(), _fresh()).values())


def test_the_shipped_artifacts_re_timing_is_the_spread_when_the_run_has_one():
    metrics = _metrics(latency_ms_deployed=3.0, latency_deployed_p25_ms=2.9, latency_deployed_p75_ms=3.2)
    got = _verdicts(metrics, _fresh(median_ms=2.05))  # inside the gate's spread, not the deployed one
    assert not got["median inside the recorded spread"]
    assert _verdicts(metrics, _fresh(median_ms=3.1))["median inside the recorded spread"]
    # slack widens the band by a fraction of the recorded median, and only when asked
    assert _verdicts(metrics, _fresh(median_ms=2.05), slack=0.5)["median inside the recorded spread"]
    # and slack_ms by milliseconds
    assert _verdicts(metrics, _fresh(median_ms=2.05), slack_ms=0.9)["median inside the recorded spread"]
    assert not _verdicts(metrics, _fresh(median_ms=2.05), slack_ms=0.5)["median inside the recorded spread"]


@pytest.mark.parametrize(("fresh", "metrics", "failed"), [
    ({"torch_imported": True}, {}, "fresh process: no torch / autoshrink"),
    ({"version": "1.2.4"}, {}, "runtime, version"),
    ({"threads": 2}, {}, "threads"),
    ({"median_ms": 2.5}, {}, "median inside the recorded spread"),
    ({"median_ms": 5.5}, {"latency_ms": 5.4}, "meets the latency budget"),
    ({"accuracy": 89.5}, {}, "int8 accuracy on the validation split"),  # two samples of 400 off
])
def test_each_check_fails_on_its_own(fresh, metrics, failed):
    got = _verdicts(_metrics(**metrics), _fresh(**fresh))
    assert [k for k, ok in got.items() if not ok] == [failed]


def test_one_sample_of_accuracy_is_a_tie_not_a_failure():
    assert _verdicts(_metrics(), _fresh(accuracy=90.25))["int8 accuracy on the validation split"]


def test_an_inductor_run_or_a_missing_best_is_refused_in_one_line(tmp_path, capsys):
    checker = _checker()
    assert checker.main([str(tmp_path)]) == 2
    assert "metrics.json: not found" in capsys.readouterr().err
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "metrics.json").write_text(json.dumps(_metrics(runtime="inductor")))
    assert checker.main([str(tmp_path)]) == 2
    assert "timed in 'inductor'" in capsys.readouterr().err


@pytest.mark.slow
# the ONNX Runtime search runs always (test_search_in_runtime_e2e.py), as do OpenVINO's trial artifacts
@pytest.mark.heavy
def test_an_openvino_search_passes_the_check_in_a_process_with_openvino_alone(tiny_task, tiny_space, tmp_path):
    import autoshrink as ash
    from autoshrink import runtimes

    if "openvino" not in runtimes.available():
        pytest.skip("openvino is not installed")
    out = tmp_path / "run"
    result = ash.search(tiny_task, tiny_space, ash.Budget(latency_ms=5.0), trials=1, workers=1, out=out, seed=0,
                        progress=False, latency_runs=20, early_stopping=False, runtime="openvino")
    assert result.best is not None, result.trials.to_string()
    assert result.best["latency_source"] == "deployed"  # the shipped model.xml was re-timed
    xv, yv = tiny_task.val_data.tensors
    np.savez(tmp_path / "val.npz", x=xv.numpy(), y=yv.numpy())
    report = tmp_path / "check.json"
    # a 2-core machine shared with other jobs moves sub-millisecond medians by half (as the e2e tests
    # allow), a fresh process runs these ~0.07 ms models up to ~0.05 ms slower, and once (this test
    # in a whole-suite run) a median landed past that: the band gets up to 3 tries
    code = _checker().main([str(out), "--val-npz", str(tmp_path / "val.npz"), "--slack", "0.5", "--slack-ms", "0.05",
                            "--tries", "3", "--json", str(report)])
    got = json.loads(report.read_text())
    assert not got["fresh"]["torch_imported"] and not got["fresh"]["autoshrink_imported"]
    assert code == 0, json.dumps({k: got[k] for k in ("checks", "load", "tries_median_ms")}, indent=1)


def _run_folder(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "metrics.json").write_text(json.dumps(_metrics()))
    (tmp_path / "best" / "model.onnx").write_bytes(b"")
    np.savez(tmp_path / "val.npz", x=np.zeros((1, 1), np.float32), y=np.zeros(1, np.int64))
    return ["--val-npz", str(tmp_path / "val.npz"), "--json", str(tmp_path / "check.json")]


@pytest.mark.parametrize(("tries", "sequence", "code", "timed"), [
    (3, [{"median_ms": 4.0}, {"median_ms": 2.05}], 0, 2),  # slow once (another job), then inside
    (2, [{"median_ms": 4.0}, {"median_ms": 4.0}, {}], 1, 2),  # slow every try: it fails
    (1, [{"median_ms": 4.0}, {}], 1, 1),  # the default: one try
    (3, [{"median_ms": 4.0, "accuracy": 50.0}, {}], 1, 1),  # another check failed: no re-timing
])
def test_only_the_spread_check_is_re_timed_up_to_tries(tmp_path, monkeypatch, tries, sequence, code, timed):
    checker = _checker()
    calls = iter(sequence)
    monkeypatch.setattr(checker, "fresh_run", lambda *a, **k: _fresh(**next(calls)))
    monkeypatch.setattr(checker.time, "sleep", lambda s: None)
    assert checker.main([str(tmp_path), *_run_folder(tmp_path), "--tries", str(tries)]) == code
    got = json.loads((tmp_path / "check.json").read_text())
    assert len(got["tries_median_ms"]) == timed

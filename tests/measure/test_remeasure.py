"""Re-timing saved artifacts: statistics, the interleaved loop, and the fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from autoshrink.measure.remeasure import (
    RemeasureError,
    bootstrap_median_interval,
    remeasure,
    spread,
    time_interleaved,
)


def test_spread_quantiles_and_interval():
    rng = np.random.default_rng(0)
    times = 2.0 + rng.gamma(2.0, 0.05, size=(10, 10))
    s = spread(times, threads=1)
    assert s.runs == 100 and s.rounds == 10
    assert s.p25_ms <= s.median_ms <= s.p75_ms <= s.p90_ms
    assert s.ci_low_ms <= s.median_ms <= s.ci_high_ms
    assert s.median_ms == pytest.approx(float(np.median(times)))
    assert spread(times) == spread(times)  # seeded


def test_interval_resamples_rounds_so_a_slow_round_widens_it():
    rng = np.random.default_rng(1)
    calm = 2.0 + rng.normal(0, 0.01, size=(10, 10))
    drift = calm + np.repeat(rng.normal(0, 0.2, size=(10, 1)), 10, axis=1)  # whole rounds shift
    lo_c, hi_c = bootstrap_median_interval(calm)
    lo_d, hi_d = bootstrap_median_interval(drift)
    assert hi_d - lo_d > 5 * (hi_c - lo_c)
    # resampling single calls would hide the round effect
    lo_i, hi_i = bootstrap_median_interval(drift.reshape(-1))
    assert hi_d - lo_d > 2 * (hi_i - lo_i)


@pytest.mark.parametrize("bad, match", [
    ({"times_ms": []}, "non-empty"),
    ({"times_ms": [[1.0], [1.0]], "resamples": 0}, "resamples >= 1"),
    ({"times_ms": [[1.0]], "confidence": 1.0}, "0 < confidence < 1"),
])
def test_bootstrap_rejects_bad_input(bad, match):
    times = bad.pop("times_ms")
    with pytest.raises(ValueError, match=match):
        bootstrap_median_interval(times, **bad)


def test_interleaved_order_and_fake_timer():
    order: list[str] = []
    clock = {"t": 0.0}

    def model(name: str, ms: float):
        def run(_x):
            order.append(name)
            clock["t"] += ms / 1e3

        return run

    times = time_interleaved([model("A", 1.0), model("B", 3.0)], torch.zeros(1, 2), rounds=3, runs=2,
                             warmup=1, timer=lambda: clock["t"])
    assert [t.shape for t in times] == [(3, 2), (3, 2)]
    assert np.allclose(times[0], 1.0) and np.allclose(times[1], 3.0)
    # compile A B, warm A B, then per round: A (untimed + 2 timed), B (untimed + 2 timed)
    assert "".join(order) == "AB" + "AB" + "AAABBB" * 3


def test_interleaved_rejects_bad_counts():
    with pytest.raises(ValueError, match="rounds >= 1"):
        time_interleaved([nn.Identity()], torch.zeros(1, 2), rounds=0)


def test_missing_artifact_is_listed_not_fatal(tmp_path):
    out = remeasure([tmp_path / "nope" / "model.pt2"], torch.zeros(1, 1, 8, 8), rounds=1, runs=1, warmup=0,
                    timeout_s=300)
    assert out.spreads == {}
    (path, error), = out.errors.items()
    assert path.endswith("model.pt2") and "FileNotFoundError" in error
    assert out.load["cores"] >= 1
    if os.path.exists("/proc/stat"):  # the busy cores of the timing process's window, not the load average
        assert out.load["noisy_by"] == "busy" and out.load["busy_cores"] is not None


def test_a_crashing_process_raises_with_its_output(tmp_path):
    with pytest.raises(RemeasureError, match="exited with"):
        remeasure([tmp_path / "model.pt2"], torch.zeros(1, 2), loader="no_such_module_xyz:load", timeout_s=300)


def _tiny_artifact(tmp_path):
    from autoshrink import Candidate
    from autoshrink.compress.quantize import lower, prepare_ptq
    from autoshrink.trial import save_deployable

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    x = torch.randn(1, 1, 16, 16)
    calib = [torch.randn(8, 1, 16, 16) for _ in range(2)]
    lowered = lower(prepare_ptq(model, Candidate.uniform(bits=8), x, calib))
    return save_deployable(lowered, x, tmp_path / "trials" / "0000" / "model.pt2"), x


_USER_TIMING = """
import json, sys, torch
from autoshrink.export import load_deployable
from autoshrink.measure.latency import measure_latency
x = torch.load(sys.argv[2], weights_only=True)
lat = measure_latency(load_deployable(sys.argv[1]), x, runs=100, warmup=10, threads=1)
print(json.dumps({"median_ms": lat.median_ms}))
"""


@pytest.mark.slow
def test_shipped_artifact_retimed_in_a_fresh_process_lands_inside_the_reported_spread(tmp_path):
    path, x = _tiny_artifact(tmp_path)
    out = remeasure([path, path], x, rounds=10, runs=10, warmup=10)
    assert not out.errors
    s = out.spreads[str(path)]
    assert s.runs == 100 and s.threads == 1
    assert s.p25_ms <= s.median_ms <= s.p75_ms <= s.p90_ms
    assert s.ci_low_ms <= s.median_ms <= s.ci_high_ms
    # a user times the same file the way time_exported.py does, in another fresh process
    torch.save(x, tmp_path / "x.pt")
    # a shared machine drifts between processes (CI once read the user's 0.181 ms against a p25 of
    # 0.190): the reported spread, with the margin the search's end-to-end test allows for that.
    # Faster than reported is the safe side (interference only adds time; an AVX2 EPYC here once read
    # the user's 0.152 ms against a p25 of 0.210), so the lower margin is wider: it catches a wrong
    # figure, and the upper one guards what a budget relies on. This 2-vCPU EPYC's timings of this
    # model also switch between two levels, ~0.22 and ~0.37 ms, from one process to the next on
    # either core (a whole-suite run read the user's 0.387 ms against a p90 of 0.243), so a timing
    # above the band is repeated in a new fresh process, up to three in all, and the fastest counts,
    # as test_finalize_e2e and ``experiments/check_runtime_export.py --tries`` do
    users = []
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", _USER_TIMING, str(path), str(tmp_path / "x.pt")],
                              capture_output=True, text=True, timeout=600, check=True)
        users.append(json.loads(proc.stdout.strip().splitlines()[-1])["median_ms"])
        if min(users) <= 1.33 * s.p90_ms:
            break
    user = min(users)
    assert 0.5 * min(s.p25_ms, s.ci_low_ms) <= user <= 1.33 * s.p90_ms, (users, s)


@pytest.mark.slow
def test_latency_meter_retimes_artifacts_sent_as_bytes(tmp_path):
    # what a Ray actor on the latency-target node does with the finalists' model.pt2 contents
    from autoshrink.measure.latency import LatencyMeter

    path, x = _tiny_artifact(tmp_path)
    out = LatencyMeter().remeasure({"trial 0": path.read_bytes(), "broken": b"not a program"}, x,
                                   rounds=3, runs=5, warmup=2)
    assert set(out.spreads) == {"trial 0"} and set(out.errors) == {"broken"}
    assert out.spreads["trial 0"].runs == 15
    assert "not a loadable torch.export program" in out.errors["broken"]


def test_trial_retimer_reports_missing_and_broken_artifacts(tmp_path):
    from autoshrink.measure.remeasure import TrialRetimer

    def artifact(n):
        return tmp_path / "trials" / f"{n:04d}" / "model.pt2"

    artifact(1).parent.mkdir(parents=True)
    artifact(1).write_bytes(b"not a program")
    retime = TrialRetimer(artifact, torch.zeros(1, 2), rounds=1, runs=1, warmup=0)
    assert retime([0]) == {0: f"no artifact at {artifact(0)} (not saved, or deleted)"}  # no process started
    assert retime.loads == []
    out = retime([0, 1])
    assert "no artifact" in out[0] and "not a loadable torch.export program" in out[1]
    assert len(retime.loads) == 1


@pytest.mark.slow
def test_rechoose_with_real_retiming_records_the_deployed_figures(tmp_path):
    import pandas as pd

    from autoshrink.finalists import rechoose
    from autoshrink.measure.remeasure import TrialRetimer

    path, x = _tiny_artifact(tmp_path)
    trials = pd.DataFrame({"number": [0, 1], "state": ["COMPLETE", "COMPLETE"], "accuracy": [90.0, 80.0],
                           "latency_ms": [0.001, 0.0005], "meets_budget": [True, True]})
    # trial 1's artifact is missing: it is noted, and trial 0 is chosen on its re-timed figure
    retime = TrialRetimer(lambda n: path if n == 0 else tmp_path / "gone.pt2", x, rounds=3, runs=5, warmup=2)
    out = rechoose(trials, {"latency_ms": 1e3}, retime)
    assert int(out.chosen["number"]) == 0 and out.chosen["latency_source"] == "deployed"
    assert out.chosen["latency_ms_deployed"] > 0.001  # a real timing replaced the gate's figure
    row1 = out.trials.set_index("number").loc[1]
    assert row1["latency_source"] == "gate" and pd.isna(row1["latency_ms_deployed"])
    assert any("trial 1: could not be re-timed" in n for n in out.notes)
    assert len(retime.loads) == 1


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_another_runtimes_artifact_is_retimed_in_a_process_with_that_runtime_alone(tmp_path, runtime, monkeypatch):
    """As it is deployed: ``python -I`` with the runtime and numpy, no torch (which slowed OpenVINO
    ~4 %), the settings the search timed with, and a broken artifact listed beside a good one."""
    pytest.importorskip(runtime)
    from autoshrink import Candidate, runtimes
    from autoshrink.compress.quantize import lower, prepare_ptq
    from autoshrink.measure import fresh

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10)).eval()
    x = torch.randn(1, 1, 16, 16)
    lowered = lower(prepare_ptq(net, Candidate.uniform(bits=8), x, [torch.randn(8, 1, 16, 16)]))
    rt = runtimes.get(runtime)
    good = tmp_path / "trials" / "0001"
    rt.save(rt.build(lowered, x[:1]), good)
    broken = tmp_path / "trials" / "0002"
    broken.mkdir(parents=True)
    (broken / fresh.ARTIFACTS[runtime]).write_text("not a model")
    (broken / "model.bin").write_text("")
    seen = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd) or real_run(cmd, **kw))
    out = remeasure([good / "model.pt2", broken / "model.pt2"], x, rounds=2, runs=3, warmup=1, runtime=runtime,
                    lock_dir=tmp_path / "locks")
    (cmd,) = seen
    assert cmd[1] == "-I" and cmd[2] == fresh.__file__  # the isolated interpreter, this file as its script
    s = out.spreads[str(good / "model.pt2")]
    assert s.runs == 6 and s.rounds == 2 and s.threads == 1 and s.p25_ms <= s.median_ms <= s.p75_ms
    assert list(out.errors) == [str(broken / "model.pt2")]
    assert out.load["cores"] >= 1
    if os.path.exists("/proc/stat"):  # the child's own window, sent back and read here
        assert out.load["noisy_by"] == "busy" and out.load["busy_cores"] is not None
    assert "imported" not in (out.warning or "")  # neither torch nor autoshrink got into the child


def test_the_runtime_only_process_imports_neither_torch_nor_autoshrink(tmp_path):
    """The child's own record of what it imported (here with no artifact to open: the imports
    of the script itself and of numpy are what is checked)."""
    from autoshrink.measure import fresh

    np.save(tmp_path / "x.npy", np.zeros((1, 1, 4, 4), np.float32))
    subprocess.run([sys.executable, "-I", fresh.__file__, "--runtime", "onnxruntime", "--input",
                    str(tmp_path / "x.npy"), "--out", str(tmp_path / "out.json"), "--lock-dir", str(tmp_path),
                    "--", str(tmp_path / "none")], check=True, timeout=120)
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["imported"] == [] and "FileNotFoundError" in got["results"][0]["error"]

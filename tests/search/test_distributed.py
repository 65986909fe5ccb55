"""A search on a Ray cluster: a head and a worker node that is the latency target (local,
127.0.0.1, no dashboard), and the latency meter that times lowered models where it runs."""

from __future__ import annotations

import shutil
import tempfile

import optuna
import pandas as pd
import pytest
import torch
from conftest import ray_down  # tests/conftest.py: the suite's one local Ray

import autoshrink as ash
from autoshrink.measure.latency import LatencyMeter, program_bytes
from autoshrink.record import STUDY_DIRECTIONS, TEACHER_LATENCY_MS_DRIVER, State, StudyAttr
from autoshrink.search import SearchError


def test_meter_times_a_program_sent_as_bytes(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    x = torch.randn(3, 16)
    data = program_bytes(model, x)
    assert isinstance(data, bytes) and len(data) > 0
    meter = LatencyMeter(lock_dir=tmp_path)
    lat = meter.measure(data, x[:1], runs=5, threads=1)
    assert lat.median_ms > 0 and lat.runs == 5 and lat.threads == 1
    assert meter.count() == 1
    assert meter.where()["host"]


pytestmark = pytest.mark.own_ray  # a local cluster of its own, in this process


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) + one worker node (1 CPU) marked as the latency target, all on 127.0.0.1.

    Two settings keep it to itself: its own Ray temp folder (Ray records "the current cluster"
    there, and a plain ``ray.init()`` elsewhere on the machine would join it), and Ray's
    single-machine mode (in cluster mode Ray rewrites 127.0.0.1 to the machine's outward address,
    where a loopback-only cluster cannot be reached; the mode only changes that resolution)."""
    ray = pytest.importorskip("ray")
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    ray_down()  # the suite's shared Ray, if up
    with pytest.MonkeyPatch.context() as mp:
        ray_tmp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths live under it
        mp.setenv("RAY_TMPDIR", ray_tmp)
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1",
        })
        try:
            target = c.add_node(num_cpus=1, resources={"latency_target": 1}, node_ip_address="127.0.0.1")
            c.wait_for_nodes()
            yield c, target
        finally:
            ray.shutdown()
            c.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_search_on_a_cluster_times_latency_on_the_target(tiny_task, tiny_space, cluster, tmp_path, no_finalize):
    # the trials and the study's records are checked here, not the finalists' re-timing (~20 s;
    # tests/search/test_finalize_e2e.py checks it)
    c, target = cluster
    result = ash.search(tiny_task, tiny_space, ash.Budget(latency_ms=50.0), trials=2, workers=2,
                        out=tmp_path, seed=0, ray_address=c.address, progress=False, latency_runs=10)
    df = pd.read_csv(tmp_path / "trials.csv")
    assert len(df) == 2 and df["number"].tolist() == [0, 1]
    assert (df["state"] == State.COMPLETE).all(), df["error"].tolist()
    assert (df["latency_ms"] > 0).all() and (df["mmacs"] > 0).all()
    assert df["meets_budget"].all() and (df["finetune_s"] > 0).all()
    assert df["accuracy"].between(0, 100).all()
    assert df["param_prune.stage2"].tolist() == [0.0, 0.25]  # the int8 baselines went first
    study = optuna.load_study(study_name="autoshrink", storage=f"sqlite:///{tmp_path / 'study.db'}")
    where = study.user_attrs[StudyAttr.LATENCY_MEASURED_ON]
    assert where["resource"] == "latency_target" and where["node_id"] == target.node_id
    teacher = study.user_attrs[StudyAttr.TEACHER]
    assert teacher["latency_ms"] > 0 and teacher[TEACHER_LATENCY_MS_DRIVER] > 0
    assert result.teacher["latency_ms"] == pytest.approx(teacher["latency_ms"])


@pytest.mark.slow
def test_an_absent_latency_target_is_an_error(cluster, tmp_path):
    from autoshrink.search import Driver, DriverConfig

    c, _ = cluster
    study = optuna.create_study(directions=STUDY_DIRECTIONS)
    config = DriverConfig(budget=ash.Budget(), out=tmp_path, ray_address=c.address, latency_target="edge_tpu")
    driver = Driver(task=None, space=None, study=study, config=config)
    driver.start_ray()
    with pytest.raises(SearchError, match=r"offers no resource 'edge_tpu'.*--resources '\{\"edge_tpu\": 1\}'"):
        driver.latency_meter()

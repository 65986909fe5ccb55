"""Where a search's trials fine-tune: ``device`` / ``gpus_per_trial`` against the GPUs there are,
the ``workers`` default, what each trial asks Ray for, and a CUDA out-of-memory as one failed
trial. No GPU is used: torch's CUDA queries and Ray's cluster resources are faked."""

from __future__ import annotations

import importlib
import os

import optuna
import pytest
import torch

import autoshrink as ash
from autoshrink.device import DeviceError, TrialOOM
from autoshrink.record import STUDY_DIRECTIONS, State, StudyAttr, TrialAttr
from autoshrink.search import DevicePlan, DriverConfig, TrialSettings, plan_devices, run_trials

search_pkg = importlib.import_module("autoshrink.search")  # the package (autoshrink.search is the function)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """torch *says* this machine has two GPUs (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def gpu_cluster(monkeypatch):
    """A joined Ray cluster with 4 GPUs and 64 CPUs, seen from a driver without CUDA."""
    import ray

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 4.0, "CPU": 64.0, "memory": 1e12})


# -- plan_devices: the rules ---------------------------------------------------------------------
@pytest.mark.parametrize("device, gpus_per_trial, counts, expected", [
    ("cuda", None, (2.0, 16.0), ("cuda", 1.0, 2)),
    ("cuda", 0.5, (2.0, 16.0), ("cuda", 0.5, 4)),
    ("cuda", 0.3, (1.0, 16.0), ("cuda", 0.3, 3)),
    ("cuda", 2, (4.0, 16.0), ("cuda", 2.0, 2)),
    ("cuda", 0.25, (4.0, 6.0), ("cuda", 0.25, 6)),  # 16 fit on the GPUs; the CPUs allow 6
    ("auto", None, (1.0, 16.0), ("auto", 1.0, 1)),
    ("AUTO", 0.5, (1.0, 16.0), ("auto", 0.5, 2)),
    ("auto", None, (0.0, 16.0), ("auto", 0.0, None)),  # no GPU: as the CPU
    ("cpu", None, (8.0, 16.0), ("cpu", 0.0, None)),  # GPUs there, but not asked for
])
def test_the_plan_and_the_workers_default(device, gpus_per_trial, counts, expected):
    from autoshrink.search import default_workers

    plan = plan_devices(device, gpus_per_trial, None, counts=counts)
    workers = expected[2] if expected[2] is not None else default_workers()
    assert (plan.device, plan.gpus_per_trial, plan.workers) == (*expected[:2], workers)
    assert plan_devices(device, gpus_per_trial, 7, counts=counts).workers == 7  # given: kept


@pytest.mark.parametrize("device, gpus_per_trial, counts, message", [
    ("cpu", 0.5, (2.0, 16.0), r"^--gpus-per-trial 0\.5 needs --device cuda or auto \(with --device cpu no trial "
                              r"uses a GPU\)$"),
    ("auto", 1, (0.0, 16.0), r"^--gpus-per-trial 1 needs a GPU, and this machine has none"),
    ("cuda", 1.5, (2.0, 16.0), r"^--gpus-per-trial 1\.5: above 1 it must be a whole number"),
    ("cuda", 3, (2.0, 16.0), r"^--gpus-per-trial 3: this machine has 2 GPU\(s\), so no trial could start; "
                             r"ask for at most 2$"),
    ("cuda", 0, (2.0, 16.0), r"^--gpus-per-trial must be a positive number, got 0$"),
    ("cuda", float("nan"), (2.0, 16.0), r"^--gpus-per-trial must be a positive number, got nan$"),
    ("gpu", None, (2.0, 16.0), r"expected one of \['auto', 'cpu', 'cuda'\] or cuda:N"),
])
def test_what_does_not_apply_is_an_error_naming_what_it_needs(device, gpus_per_trial, counts, message):
    with pytest.raises(DeviceError, match=message):
        plan_devices(device, gpus_per_trial, None, counts=counts)


def test_cuda_without_a_gpu_here_is_torchs_one_line_error(no_cuda):
    with pytest.raises(DeviceError, match=r"^--device cuda: CUDA is not available here \(torch .*\); use --device "
                                          r"cpu or --device auto, or install a CUDA build of torch$"):
        plan_devices("cuda")
    with pytest.raises(DeviceError, match=r"^--device cuda:1: CUDA is not available here"):
        plan_devices("cuda:1")
    assert plan_devices("auto").gpus_per_trial == 0.0


def test_cuda_n_is_refused_for_trials_in_ray_workers(two_gpus):
    with pytest.raises(DeviceError, match=r"^--device cuda:1: trials run in Ray workers, each seeing only the "
                                          r"GPU\(s\) Ray gives it; use --device cuda \(restrict the GPUs with "
                                          r"CUDA_VISIBLE_DEVICES\)$"):
        plan_devices("cuda:1")
    assert plan_devices("cuda", 0.5) == DevicePlan("cuda", 0.5, min(4, os.cpu_count()))


def test_a_cluster_is_asked_for_its_gpus_not_the_driver(gpu_cluster):
    plan = plan_devices("cuda", 0.5, None, "10.0.0.1:6379")
    assert (plan.device, plan.gpus_per_trial, plan.workers) == ("cuda", 0.5, 8)
    assert plan_devices("auto", None, None, "10.0.0.1:6379").workers == 4


def test_a_cluster_without_gpus_is_named(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(DeviceError, match=r"^--device cuda: the Ray cluster at A:6379 offers no GPU "
                                          r"\(ray.cluster_resources\(\) has no 'GPU'\); use --device cpu"):
        plan_devices("cuda", None, None, "A:6379")
    with pytest.raises(DeviceError, match=r"^--gpus-per-trial 0\.5 needs a GPU, and the Ray cluster at A:6379 "
                                          r"has none"):
        plan_devices("auto", 0.5, None, "A:6379")


# -- search() and the driver: the plan reaches each trial ------------------------------------------
def _capture_config(monkeypatch) -> dict:
    """Replace what search() runs after validating with a spy of its SearchConfig."""
    seen: dict = {}

    def spy(task, space, budget, config, sampler_obj, load, **_kw):
        seen["config"] = config
        return "ran"

    monkeypatch.setattr(search_pkg, "_run", spy)
    return seen


def test_search_puts_the_plan_in_its_config(tiny_task, tiny_space, two_gpus, monkeypatch, tmp_path):
    seen = _capture_config(monkeypatch)
    assert ash.search(tiny_task, tiny_space, trials=2, out=tmp_path / "a", device="cuda", gpus_per_trial=0.5,
                      progress=False) == "ran"
    config = seen["config"]
    assert config.workers == min(4, os.cpu_count())
    assert (config.settings.device, config.settings.gpus_per_trial) == ("cuda", 0.5)
    ash.search(tiny_task, tiny_space, trials=2, out=tmp_path / "b", progress=False)  # the default: the CPU
    assert (seen["config"].settings.device, seen["config"].settings.gpus_per_trial) == ("cpu", 0.0)


def test_search_with_a_cluster_counts_the_clusters_gpus(tiny_task, tiny_space, gpu_cluster, monkeypatch, tmp_path):
    seen = _capture_config(monkeypatch)
    ash.search(tiny_task, tiny_space, trials=2, out=tmp_path / "a", device="auto", gpus_per_trial=0.5,
               ray_address="10.0.0.1:6379", progress=False)
    assert seen["config"].workers == 8
    assert (seen["config"].settings.device, seen["config"].settings.gpus_per_trial) == ("auto", 0.5)


def test_search_refuses_cuda_without_a_gpu_before_anything_else(tiny_task, no_cuda, monkeypatch, tmp_path):
    seen = _capture_config(monkeypatch)
    with pytest.raises(DeviceError, match=r"^--device cuda: CUDA is not available here"):
        ash.search(tiny_task, "no-such-space.yaml", trials=2, out=tmp_path / "a", device="cuda", progress=False)
    assert not seen and not (tmp_path / "a").exists()  # the space was not even read
    with pytest.raises(DeviceError, match=r"^--device cuda: CUDA is not available here"):
        ash.sweep(tiny_task, [ash.Candidate()], out=tmp_path / "b", device="cuda", progress=False)
    assert not (tmp_path / "b").exists()


class _Spied(Exception):
    """Stops the driver once it has asked Ray for its trial function."""


def test_each_trial_asks_ray_for_its_gpus_and_the_logits_follow_the_device(tiny_task, monkeypatch, tmp_path):
    import ray

    import autoshrink.compress.distill as distill

    driver_mod = importlib.import_module("autoshrink.search.driver")

    calls: dict = {}

    def remote(**options):
        calls["remote"] = options
        raise _Spied

    def logits(model, data, **kwargs):
        calls["logits"] = kwargs
        return None

    monkeypatch.setattr(driver_mod.Driver, "start_ray", lambda self: None)
    monkeypatch.setattr(driver_mod, "ship_user_code_by_value", lambda task: None)
    monkeypatch.setattr(ray, "put", lambda obj: obj)
    monkeypatch.setattr(ray, "remote", remote)
    monkeypatch.setattr(distill, "teacher_logits", logits)
    for device, gpus, logits_on in (("cuda", 0.5, "auto"), ("cpu", 0.0, "cpu")):
        out = tmp_path / device
        out.mkdir()
        study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="autoshrink",
                                    directions=STUDY_DIRECTIONS)
        study.set_user_attr(StudyAttr.TEACHER, {"accuracy": 90.0})  # not measured here
        settings = TrialSettings(threads=2, device=device, gpus_per_trial=gpus)
        with pytest.raises(_Spied):
            run_trials(tiny_task, study, 1, DriverConfig(budget=ash.Budget(), out=out, workers=1, settings=settings),
                       propose=lambda trial: ash.Candidate())
        assert calls["remote"] == {"num_cpus": 2, "num_gpus": gpus, "max_retries": 1}
        assert calls["logits"] == {"device": logits_on}  # the driver may have no GPU: "auto" there


# -- a CUDA out-of-memory fails one trial, the next goes on ---------------------------------------
def test_an_oom_in_one_trial_is_its_failure_reason_and_the_next_trial_runs(tiny_task, monkeypatch, tmp_path):
    """run_trial (the Ray adapter, in-process here) turns TrialOOM into a FAIL with the reason;
    the driver records it, and the following trial completes."""
    import autoshrink.trial as trial_mod
    from autoshrink._worker import run_trial
    from autoshrink.search import Driver

    real = trial_mod.finetune
    seen = []

    def finetune(*args, **kwargs):
        seen.append(kwargs["device"])
        if len(seen) == 1:
            raise TrialOOM("cuda:0", 3, 32, "CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(trial_mod, "finetune", finetune)
    monkeypatch.setattr(trial_mod, "compile_cpu", lambda m: m)  # reference kernels: no compilation to wait for
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="autoshrink",
                                directions=STUDY_DIRECTIONS)
    driver = Driver(task=None, space=None, study=study, config=DriverConfig(budget=ash.Budget(), out=tmp_path))
    cand = ash.Candidate.uniform(bits=32, steps=2, batch_size=16)
    for _ in range(2):
        metrics = run_trial(tiny_task, cand.to_dict(), {}, {"latency_runs": 0, "device": "auto"})
        driver.tell(study.ask(), cand, metrics)
    assert seen == ["cpu", "cpu"]  # "auto" resolved in the worker (no GPU here)
    first, second = study.get_trials()
    assert State.of(first) is State.FAIL
    assert first.user_attrs[TrialAttr.ERROR].startswith(
        "out of memory: TrialOOM: cuda:0 ran out of memory in the fine-tune at step 3 (batch size 32): CUDA out "
        "of memory. Tried to allocate 2.00 GiB; use a smaller batch_size, or give each trial more of a GPU")
    assert State.of(second) is State.COMPLETE and second.user_attrs[TrialAttr.FINETUNE_DEVICE] == "cpu"
    assert TrialAttr.FINETUNE_DEVICE not in first.user_attrs

"""The device and data flags: parsed and passed on; ``cuda`` without a GPU, and a flag that does
not apply, are one-line errors (exit 2) before anything is built or trained. No GPU is used:
torch's CUDA queries are faked, and no teacher is trained (the task builders are spies)."""

from __future__ import annotations

import pytest
import torch

import autoshrink as ash
import autoshrink.tasks as tasks
from autoshrink import cli
from autoshrink.cli import main


class _Reached(BaseException):
    """The command got as far as the Python API (a BaseException: the CLI reports any Exception
    that is not an autoshrink error as an internal one, exit 1, instead of letting it through)."""


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def nothing_builds(monkeypatch):
    """Any task build or teacher training fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a task was built before the arguments were checked")

    monkeypatch.setattr(tasks, "get", refuse)
    monkeypatch.setattr(tasks, "blueprint", refuse)


@pytest.fixture
def api(monkeypatch, tiny_task):
    """search/sensitivity record their keyword arguments and stop; tasks.get records its own.
    The CLI's early reachability check (a real compile and timing, tested in tests/search) is
    skipped: these tests are about the flags."""
    seen: dict = {}

    def get(name, **kwargs):
        seen["get"] = kwargs
        return tiny_task

    def stop(name):
        def call(*args, **kwargs):
            seen[name] = kwargs
            raise _Reached
        return call

    monkeypatch.setattr(tasks, "get", get)
    monkeypatch.setattr(tasks, "blueprint", lambda name: (tiny_task.model, tiny_task.example_input))
    monkeypatch.setattr(ash, "search", stop("search"))
    monkeypatch.setattr(cli, "_check_reachable_early", lambda *a, **k: None)
    monkeypatch.setattr(ash, "sensitivity", stop("sensitivity"))
    return seen


def _one_line_error(capsys, pattern: str) -> None:
    import re

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


@pytest.mark.parametrize("argv, pattern", [
    (["search", "--budget-ms", "5", "--device", "cuda"],
     r"^autoshrink: error: --device cuda: CUDA is not available here \(torch .*\); use --device cpu or "
     r"--device auto, or install a CUDA build of torch$"),
    (["search", "--budget-ms", "5", "--device", "cuda:1"], r"^autoshrink: error: --device cuda:1: CUDA is not "),
    (["search", "--budget-ms", "5", "--gpus-per-trial", "0.5"],
     r"^autoshrink: error: --gpus-per-trial 0\.5 needs a GPU, and this machine has none"),
    (["search", "--budget-ms", "5", "--device", "cpu", "--gpus-per-trial", "1"],
     r"^autoshrink: error: --gpus-per-trial 1 needs --device cuda or auto \(with --device cpu no trial uses a GPU\)"),
    (["search", "--budget-ms", "5", "--device", "gpu"],
     r"^autoshrink: error: --device 'gpu': expected one of \['auto', 'cpu', 'cuda'\] or cuda:N"),
    (["search", "--budget-ms", "5", "--gpus-per-trial", "0"], r"error: argument --gpus-per-trial: "
                                                              r"must be > 0, got 0"),
    (["search", "--budget-ms", "5", "--input-size", "224"],
     r"^autoshrink: error: --input-size applies to image folders: it needs --data imagefolder:DIR$"),
    (["search", "--budget-ms", "5", "--data-workers", "2", "--data", "cifar10:somewhere"],
     r"^autoshrink: error: --data-workers applies to image folders: it needs --data imagefolder:DIR "
     r"\(got --data cifar10:somewhere\)$"),
    (["search", "--budget-ms", "5", "--normalize", "imagenet"], r"--normalize applies to image folders"),
    (["search", "--budget-ms", "5", "--normalize", "mine"], r"argument --normalize: invalid choice: 'mine'"),
    (["sensitivity", "--device", "cuda"], r"^autoshrink: error: --device cuda: CUDA is not available here"),
    (["plan", "--input-size", "64"], r"--input-size applies to image folders"),
    (["space", "--normalize", "train"], r"--normalize applies to image folders"),
])
def test_bad_device_and_data_flags_are_one_line_errors(argv, pattern, no_cuda, nothing_builds, capsys):
    assert main(argv) == 2
    _one_line_error(capsys, pattern)


@pytest.mark.parametrize("argv, pattern", [
    (["search", "--budget-ms", "5", "--device", "cuda", "--gpus-per-trial", "3"],
     r"--gpus-per-trial 3: this machine has 2 GPU\(s\), so no trial could start; ask for at most 2"),
    (["search", "--budget-ms", "5", "--device", "cuda", "--gpus-per-trial", "1.5"],
     r"--gpus-per-trial 1\.5: above 1 it must be a whole number"),
    (["search", "--budget-ms", "5", "--device", "cuda:1"], r"--device cuda:1: trials run in Ray workers"),
])
def test_gpu_requests_that_cannot_be_granted(argv, pattern, two_gpus, nothing_builds, capsys):
    assert main(argv) == 2
    _one_line_error(capsys, pattern)


def test_plan_takes_no_device():
    """plan trains nothing: it has no --device (nor --gpus-per-trial)."""
    assert main(["plan", "--device", "cpu"]) == 2


def test_the_flags_reach_the_search(api, two_gpus):
    with pytest.raises(_Reached):
        main(["search", "--budget-ms", "5", "--device", "cuda", "--gpus-per-trial", "0.5", "--space", "auto",
              "--no-progress"])
    assert (api["search"]["device"], api["search"]["gpus_per_trial"], api["search"]["workers"]) == ("cuda", 0.5, None)
    assert api["get"]["device"] == "cuda"  # a teacher trained here trains there too


def test_the_defaults_reach_the_search(api, no_cuda):
    with pytest.raises(_Reached):
        main(["search", "--budget-ms", "5", "--space", "auto", "--workers", "3", "--no-progress"])
    assert (api["search"]["device"], api["search"]["gpus_per_trial"], api["search"]["workers"]) == ("auto", None, 3)
    assert api["search"]["predictor_screening"] is None and api["search"]["warm_start"] is None


@pytest.mark.parametrize("flag, value", [("on", True), ("off", False), ("auto", None)])
def test_predictor_screening_flag_reaches_the_search(api, no_cuda, flag, value):
    with pytest.raises(_Reached):
        main(["search", "--budget-ms", "5", "--space", "auto", "--predictor-screening", flag, "--no-progress"])
    assert api["search"]["predictor_screening"] is value


def test_with_a_cluster_the_teacher_trains_where_the_driver_can(api, monkeypatch):
    import ray

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the driver has no GPU, the cluster has
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 2.0, "CPU": 32.0})
    from autoshrink.search import ray_backend

    monkeypatch.setattr(ray_backend, "check_ray_address", lambda address: None)  # no cluster at A:6379 here
    with pytest.raises(_Reached):
        main(["search", "--budget-ms", "5", "--space", "auto", "--device", "cuda", "--ray-address", "A:6379",
              "--no-progress"])
    assert api["search"]["device"] == "cuda" and api["search"]["ray_address"] == "A:6379"
    assert api["get"]["device"] == "auto"


def test_sensitivity_takes_the_device(api, no_cuda):
    with pytest.raises(_Reached):
        main(["sensitivity", "--device", "cpu"])
    assert api["sensitivity"]["device"] == "cpu" and api["get"]["device"] == "cpu"

"""Shared fixtures: a tiny real task (digits data, a small CNN trained for a few seconds)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# Keep every cache and lock of the test run in one temporary place, and Ray local and quiet.
_TMP = tempfile.mkdtemp(prefix="autoshrink-tests-")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)  # caches (Inductor's too) go with the run
os.environ.setdefault("AUTOSHRINK_CACHE", os.path.join(_TMP, "cache"))
os.environ.setdefault("AUTOSHRINK_LOCK_DIR", os.path.join(_TMP, "locks"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")


# -- one local Ray, shared by the tests that ask for it ----------------------------------------------
# A search uses a Ray that is already up and leaves it running (as in a user's notebook); starting
# and stopping one per search cost more than a small search's trials (Ray's testing guide: share
# the cluster between tests where you can). Tests that do not ask for it get none of it: their
# searches start and stop their own Ray, with the user's code shipped as a runtime_env.
_RAY = {"shared": False, "pinned": False}  # pinned: ray_up() was called during this test (its fixtures)


def ray_up() -> None:
    """Start the suite's shared local Ray (2 CPUs) unless a Ray is up. Its workers import
    test modules by name as the tests do (pytest puts tests/ on the path)."""
    import ray

    from autoshrink.search.ray_backend import start_ray

    _RAY["pinned"] = True  # this test's searches (a fixture's included) run on it
    if ray.is_initialized():
        return
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, saved) if p)
    try:
        _RAY["shared"] = start_ray(None, num_cpus=2)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def ray_down() -> None:
    """Stop the shared Ray if it is up (a Ray a test started itself is the test's business)."""
    if _RAY["shared"]:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _RAY["shared"] = False


@pytest.fixture
def shared_ray():
    """The suite's shared local Ray, up for this test (``pytestmark = pytest.mark.usefixtures("shared_ray")``
    for a module whose searches run in this process)."""
    ray_up()
    yield


@pytest.fixture
def no_ray():
    """No Ray of the suite's is up in this process for this test (one that starts Ray itself
    and checks what it started)."""
    ray_down()
    yield


@pytest.fixture
def no_finalize(monkeypatch):
    """This test's searches skip the finalists' fresh-process re-timing and test-split scoring
    (~15-20 s a search), for a test that checks neither (tests/search/test_finalize_e2e.py does)."""
    _skip_finalize(monkeypatch)


def _skip_finalize(mp: pytest.MonkeyPatch) -> None:
    """Make ``search()`` skip the finalists' re-timing and test-split scoring (through ``mp``)."""
    import importlib

    mp.setattr(importlib.import_module("autoshrink.search"), "finalize", lambda *a, **k: [])


@pytest.fixture(autouse=True)
def _no_shared_ray_unless_asked(request, monkeypatch):
    """A test that does not ask for ``shared_ray`` gets none of it: the shared Ray is stopped
    right before the test's own search starts a Ray (``Driver.start_ray``, the one place the
    package starts or joins one; not for the search of a fixture that called :func:`ray_up`), so
    that the search starts its own, with the user's code shipped as a runtime_env, as it would
    for a user. The shared Ray is left up for the tests that never start one: stopping it after
    each of them made the next shared search pay a new Ray and cold workers (~20 s each time)."""
    _RAY["pinned"] = False
    if "shared_ray" not in request.fixturenames and _RAY["shared"]:
        import importlib

        driver = importlib.import_module("autoshrink.search.driver").Driver
        real = driver.start_ray

        def start_own(self) -> None:
            if not _RAY["pinned"]:  # not a shared fixture's search (finished_search, ...)
                ray_down()
            real(self)

        monkeypatch.setattr(driver, "start_ray", start_own)
    yield


def pytest_sessionfinish(session, exitstatus):
    ray_down()


@pytest.fixture(scope="session")
def tiny_task():
    """A small ResNet-like CNN trained briefly on a subset of the digits task: real data, a real
    teacher (~80 % accuracy), and fast enough for end-to-end tests."""
    import torch
    from torch.utils.data import TensorDataset

    from autoshrink import Task
    from autoshrink.tasks.digits import digits_data, train_teacher

    torch.manual_seed(0)
    data = digits_data()
    xt, yt = data.train.tensors
    xv, yv = data.val.tensors
    train = TensorDataset(xt[:2048], yt[:2048])
    val = TensorDataset(xv[:400], yv[:400])
    model = TinyNet()

    class _D:
        pass

    d = _D()
    d.train = train
    train_teacher(model, d, epochs=10, batch_size=64, lr=0.05, progress=False)
    return Task(model=model, train_data=train, val_data=val, example_input=xv[:1], name="tiny")


def _tiny_net_cls():
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    class TinyNet(nn.Module):
        """conv1 → layer1 (16 ch) → layer2 (32 ch) → pool → fc: names like the default space's."""

        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, 2, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.layer1 = nn.Sequential(Block(16, 16, 1))
            self.layer2 = nn.Sequential(Block(16, 32, 2))
            self.fc = nn.Linear(32, num_classes)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = self.layer2(self.layer1(x))
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    return TinyNet


TinyNet = _tiny_net_cls()


@pytest.fixture(scope="session")
def tiny_space():
    from autoshrink import SearchSpace

    return SearchSpace.from_dict(
        {
            "name": "tiny",
            "layers": [
                {"name": "stem", "pattern": "conv1", "bits": [8, 32]},
                {"name": "stage1", "pattern": "layer1.*", "bits": [4, 8], "prune": [0.0, 0.5]},
                {"name": "stage2", "pattern": "layer2.*", "bits": [8, 32], "prune": [0.0, 0.25]},
                {"name": "head", "pattern": "fc", "bits": [8, 32]},
            ],
            "distill": {"temperature": [2.0, 4.0], "alpha": 0.7},
            "finetune": {"steps": 30, "lr": 0.01, "batch_size": 32},
        },
        source="tiny.yaml",
    )


@pytest.fixture(scope="session")
def finished_search(tiny_task, tiny_space, tmp_path_factory):
    """One real finished search, shared by every test that only reads a run folder: the tiny
    task with a test split, 3 trials under 50 ms and 0.0125 MB (the size limit makes the gate
    reject some candidates), seed 0. Returns ``(result, out, task)``; do not write into ``out``."""
    from torch.utils.data import TensorDataset

    import autoshrink as ash
    from autoshrink.tasks.digits import digits_data

    xs, ys = digits_data().test.tensors
    task = ash.Task(model=tiny_task.model, train_data=tiny_task.train_data, val_data=tiny_task.val_data,
                    test_data=TensorDataset(xs[:400], ys[:400]), example_input=tiny_task.example_input,
                    name="tiny")
    out = tmp_path_factory.mktemp("finished-search")
    ray_up()
    result = ash.search(task, tiny_space, ash.Budget(latency_ms=50.0, size_mb=0.0125), trials=3, workers=1,
                        out=out, seed=0, progress=False, latency_runs=20)
    return result, out, task


@pytest.fixture(scope="session")
def second_search(finished_search, tiny_space, tmp_path_factory):
    """A second real search, shared by the tests that only read it: warm-started from
    ``finished_search`` under another budget (40 ms), 3 trials asked for and a time limit
    (``minutes=1e-4``) that lets only the first start; no finalists' re-timing (its readers,
    test_search_e2e and test_warm_start, check neither it nor the test split; test_finalize_e2e
    checks those on ``finished_search``). Returns ``(result, out, seconds)``."""
    import time

    import autoshrink as ash

    _, source, task = finished_search
    out = tmp_path_factory.mktemp("second-search")
    ray_up()
    start = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:  # as no_finalize: its readers check the trials, not the re-timing
        _skip_finalize(mp)
        result = ash.search(task, tiny_space, ash.Budget(latency_ms=40.0), trials=3, workers=1, out=out,
                            progress=False, latency_runs=10, enqueue_baselines=False, warm_start=source,
                            minutes=1e-4)
    return result, out, time.monotonic() - start


def _stops_the_shared_ray(item) -> bool:
    return item.get_closest_marker("own_ray") is not None or "no_ray" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` tests run where torch sees a GPU and are skipped elsewhere;
    ``@pytest.mark.heavy`` ones (the same end-to-end check repeated over many models) run only
    with ``AUTOSHRINK_HEAVY=1``, so that the suite keeps to its 15 minutes on 2 cores.

    Tests that start a Ray of their own in this process (``@pytest.mark.own_ray``, or the
    ``no_ray`` fixture) run last, in their order: each stops the shared Ray, and every shared
    search after it paid a new Ray and cold workers again (about 10 s a time)."""
    items[:] = [i for i in items if not _stops_the_shared_ray(i)] + [i for i in items if _stops_the_shared_ray(i)]
    if not os.environ.get("AUTOSHRINK_HEAVY"):
        heavy = pytest.mark.skip(reason="heavy: run with AUTOSHRINK_HEAVY=1 (one representative of each runs always)")
        for item in items:
            if item.get_closest_marker("heavy") is not None:
                item.add_marker(heavy)
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in marked:
        item.add_marker(skip)

"""The machine-load check before timing: more than 0.5 busy cores per core is a noisy machine.

The cores busy over a short window decide where ``/proc/stat`` can be read; the 1-minute load
average (which still reads high minutes after autoshrink's own work) only where it cannot. The
load-average tests pass ``busy=None`` to check that fallback on any machine."""

from __future__ import annotations

import os

import pytest

from autoshrink.measure import load


def test_quiet_machine_has_no_warning(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 0.3, 0.2))
    sample = load.sample_load(cores=2, busy=None)
    assert sample["load_per_core"] == pytest.approx(0.2)
    assert sample["noisy"] is False
    assert load.load_warning(sample) is None


def test_busy_machine_is_reported_noisy(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.1, 2.0, 1.0))
    sample = load.sample_load(cores=2, busy=None)
    assert sample["noisy"] is True
    text = load.load_warning(sample)
    assert "noisy machine: load average 3.10 on 2 cores (1.55 per core, above 0.5)" in text
    assert "\n" not in text


def test_threshold_is_per_core(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert load.sample_load(cores=8, busy=None)["noisy"] is False  # 0.375 per core
    assert load.sample_load(cores=4, busy=None)["noisy"] is True  # 0.75 per core


def test_no_load_average_is_unknown_not_quiet(monkeypatch):
    def missing():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", missing)
    sample = load.sample_load(cores=2, busy=None)
    assert sample["noisy"] is None and sample["load_1m"] is None
    assert load.load_warning(sample) is None


def test_cores_default_to_this_process(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert load.sample_load()["cores"] >= 1


def _stat(*cpus):
    """A /proc/stat text: the all-CPU line, then one line per CPU of (user, idle, iowait, steal) ticks."""
    rows = [[user, 0, 0, idle, iowait, 0, 0, steal] for user, idle, iowait, steal in cpus]
    total = [sum(col) for col in zip(*rows, strict=True)]
    lines = ["cpu  " + " ".join(map(str, total))] + [f"cpu{i} " + " ".join(map(str, r)) for i, r in enumerate(rows)]
    return "\n".join(lines + ["intr 12345", "ctxt 678"]) + "\n"


def _reader(*texts):
    it = iter(texts)
    return lambda: next(it)


def test_busy_cores_counts_the_cpus_this_process_runs_on():
    # over the window cpu0 ran 100 ticks of other work, cpu1 idled its 100 ticks
    before = _stat((1000, 5000, 0, 0), (200, 9000, 0, 0))
    after = _stat((1100, 5000, 0, 0), (200, 9100, 0, 0))

    def busy(cpus):
        return load.busy_cores(read=_reader(before, after), sleep=lambda s: None, cpus=cpus)

    assert busy({0}) == pytest.approx(1.0)
    assert busy({1}) == pytest.approx(0.0)
    assert busy({0, 1}) == pytest.approx(1.0)  # one of the two cores busy
    assert busy(None) == pytest.approx(1.0)  # the all-CPU line: 100 of 200 ticks, 2 CPUs' worth of ticks


def test_io_wait_is_idle_and_stolen_time_is_busy():
    before = _stat((0, 0, 0, 0), (0, 0, 0, 0))
    after = _stat((0, 50, 50, 0), (0, 40, 0, 60))  # cpu0 waits on the disk; cpu1's host gives it away
    assert load.busy_cores(read=_reader(before, after), sleep=lambda s: None, cpus={0}) == pytest.approx(0.0)
    assert load.busy_cores(read=_reader(before, after), sleep=lambda s: None, cpus={1}) == pytest.approx(0.6)


def test_busy_cores_is_none_without_proc_stat_or_with_garbage():
    def missing():
        raise OSError("no /proc/stat")

    assert load.busy_cores(read=missing, sleep=lambda s: None) is None
    assert load.busy_cores(read=_reader("intr 1\n", "intr 2\n"), sleep=lambda s: None, cpus={0}) is None
    assert load.busy_cores(read=_reader("cpu0 a b c d\n", "cpu0 a b c d\n"), sleep=lambda s: None, cpus={0}) is None
    same = _stat((10, 10, 0, 0))
    assert load.busy_cores(read=_reader(same, same), sleep=lambda s: None, cpus={0}) is None  # no tick passed


def test_busy_cores_sleeps_for_its_window():
    slept = []
    stats = _reader(_stat((0, 0, 0, 0)), _stat((0, 100, 0, 0)))
    assert load.busy_cores(0.1, read=stats, sleep=slept.append, cpus={0}) == pytest.approx(0.0)
    assert slept == [0.1]


def test_the_window_decides_over_the_load_average(monkeypatch):
    """Minutes after a search's own trials the load average still reads ~1.5 on an idle machine: the
    window says the machine is quiet now, and no warning blames other programs."""
    monkeypatch.setattr(os, "getloadavg", lambda: (3.1, 2.0, 1.0))
    quiet = load.sample_load(cores=2, busy=lambda: 0.1)
    assert quiet["noisy"] is False and quiet["noisy_by"] == "busy" and quiet["load_1m"] == pytest.approx(3.1)
    assert load.load_warning(quiet) is None
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    busy = load.sample_load(cores=2, busy=lambda: 1.5)
    assert busy["noisy"] is True and busy["load_per_core"] == pytest.approx(0.75)
    assert "noisy machine: 1.50 of 2 cores busy with other work" in load.load_warning(busy)


def test_no_window_falls_back_to_the_load_average(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.1, 2.0, 1.0))
    sample = load.sample_load(cores=2, busy=lambda: None)
    assert sample["noisy"] is True and sample["noisy_by"] == "load_average" and sample["busy_cores"] is None


def test_on_linux_the_window_is_sampled():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this platform")
    sample = load.sample_load()
    assert sample["noisy_by"] == "busy" and 0.0 <= sample["busy_cores"] <= sample["cores"] + 0.5

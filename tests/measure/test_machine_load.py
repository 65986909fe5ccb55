"""The machine-load check before timing: a load above 0.5 per core is a noisy machine."""

from __future__ import annotations

import os

import pytest

from autoshrink.measure import load


def test_quiet_machine_has_no_warning(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 0.3, 0.2))
    sample = load.sample_load(cores=2)
    assert sample["load_per_core"] == pytest.approx(0.2)
    assert sample["noisy"] is False
    assert load.load_warning(sample) is None


def test_busy_machine_is_reported_noisy(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.1, 2.0, 1.0))
    sample = load.sample_load(cores=2)
    assert sample["noisy"] is True
    text = load.load_warning(sample)
    assert "noisy machine: load average 3.10 on 2 cores (1.55 per core, above 0.5)" in text
    assert "\n" not in text


def test_threshold_is_per_core(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert load.sample_load(cores=8)["noisy"] is False  # 0.375 per core
    assert load.sample_load(cores=4)["noisy"] is True  # 0.75 per core


def test_no_load_average_is_unknown_not_quiet(monkeypatch):
    def missing():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", missing)
    sample = load.sample_load(cores=2)
    assert sample["noisy"] is None and sample["load_1m"] is None
    assert load.load_warning(sample) is None


def test_cores_default_to_this_process(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert load.sample_load()["cores"] >= 1

"""SIGTERM ends a real ``autoshrink search`` within 5 s of being sent during its first trial, with
Ray shut down (no process of its group left) and a consistent store (``check_study_db`` passes,
no trial left RUNNING)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from autoshrink.store import check_study_db

NET = """\
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes=2):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def build(num_classes=2):
    return Net(num_classes)
"""
# fine-tuning long enough that the first trial is still running when SIGTERM comes
SPACE = """\
layers:
  - {pattern: conv, bits: [8], prune: [0.0, 0.5]}
finetune: {steps: 100000, lr: 0.01, batch_size: 4}
"""


def _running(db) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT count(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
def test_sigterm_during_the_first_trial_ends_the_search_within_5_s(tmp_path):
    (tmp_path / "sigterm_net.py").write_text(NET)
    (tmp_path / "space.yaml").write_text(SPACE)
    g = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(tmp_path / "images" / label / f"{i}.png")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "search.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "autoshrink.cli", "search", "--model", "sigterm_net:build",
             "--data", "imagefolder:images", "--space", "space.yaml", "--budget-mmacs", "10", "--trials", "2",
             "--workers", "1", "--no-early-stopping", "--no-progress", "--out", str(run)],
            cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240  # Ray's start on a loaded 2-core machine
        while _running(run / "study.db") == 0:
            assert proc.poll() is None, f"search ended ({proc.returncode}) early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no trial started:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        time.sleep(2.0)  # the trial is in a Ray worker now
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)  # the hang guard; the assertion is the 5 s below
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 30 s after SIGTERM:\n{log.read_text()[-3000:]}")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            alive_after = _group_alive(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        else:
            alive_after = False
    text = log.read_text()
    assert took < 5.0, f"took {took:.1f} s after SIGTERM:\n{text[-3000:]}"
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "interrupted" in text and "Traceback" not in text, text[-3000:]
    assert not alive_after, "Ray processes of the search outlived it"
    check_study_db(run / "study.db")
    assert _running(run / "study.db") == 0  # the interrupted trial is failed, re-run by --resume

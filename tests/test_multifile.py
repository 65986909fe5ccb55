"""A model whose classes live in two of the user's files runs on Ray workers (issue 11, item 5).

The files are written to a temporary folder on ``sys.path`` (as ``PYTHONPATH=DIR autoshrink
--model mf_net:build`` puts them) that is not the current folder (which local Ray workers would
search too); pickling their classes by value alone failed in every trial with
``ModuleNotFoundError: No module named 'mf_blocks'`` inside Dynamo.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch.utils.data import TensorDataset

import autoshrink as ash
import autoshrink._usercode as usercode
from autoshrink.tasks.custom import build_model

BLOCKS = '''
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))
'''

NET = '''
import torch.nn as nn

from {blocks} import Block


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.b1 = Block(1, 16)
        self.b2 = Block(16, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.b2(self.b1(x)).mean((2, 3)))


def build(num_classes=10):
    return Net(num_classes)
'''


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """Two flat files and a package in a folder on sys.path; sys.path and the imported modules
    are restored afterwards."""
    tmp_path = tmp_path / "code"
    tmp_path.mkdir()
    (tmp_path / "mf_blocks.py").write_text(textwrap.dedent(BLOCKS))
    (tmp_path / "mf_net.py").write_text(textwrap.dedent(NET.format(blocks="mf_blocks")))
    pkg = tmp_path / "mf_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "blocks.py").write_text(textwrap.dedent(BLOCKS))
    (pkg / "net.py").write_text(textwrap.dedent(NET.format(blocks=".blocks")))
    (pkg / "weights.pt").write_bytes(b"\0" * 64)
    (pkg / "table.csv").write_bytes(b"x" * 4096)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith(("mf_net", "mf_blocks", "mf_pkg")):
            del sys.modules[name]


def _task(model) -> ash.Task:
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    return ash.Task(model=model, train_data=TensorDataset(x, y), val_data=TensorDataset(x, y),
                    example_input=x[:1], name="multifile")


def test_both_files_of_the_user_code_are_shipped(user_folder):
    env = usercode.runtime_env(_task(build_model("mf_net:build")))
    assert sorted(env["py_modules"]) == sorted([str(user_folder / "mf_blocks.py"), str(user_folder / "mf_net.py")])


def test_a_package_is_shipped_as_its_folder_without_weights_or_big_files(user_folder, monkeypatch):
    monkeypatch.setattr(usercode, "MAX_FILE_MB", 0.001)  # 1 kB: table.csv is "big"
    env = usercode.runtime_env(_task(build_model("mf_pkg.net:build")), base={"env_vars": {"A": "1"}})
    assert env["py_modules"] == [str(user_folder / "mf_pkg")]
    assert "*.pt" in env["excludes"] and "/table.csv" in env["excludes"]
    assert env["env_vars"] == {"A": "1"}


def test_installed_code_is_not_shipped():
    assert usercode.runtime_env(_task(ash.models.create("resnet20", in_chans=1))) is None


@pytest.mark.slow  # a real Ray sweep: one fp32 trial, one fine-tune step (~1 min on 2 cores)
@pytest.mark.own_ray  # the user's code shipped to a Ray of the search's own, as for a user
def test_a_two_file_model_sweeps_on_ray_workers(user_folder, tmp_path):
    df = ash.sweep(_task(build_model("mf_net:build")),
                   [ash.Candidate.uniform(bits=32, prune=0.0, steps=1, batch_size=32)],
                   ash.Budget(latency_ms=1e4), workers=1, out=tmp_path / "run", progress=False, latency_runs=2)
    assert df[["state", "error"]].to_dict("records") == [{"state": "COMPLETE", "error": ""}]

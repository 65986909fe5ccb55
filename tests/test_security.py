"""Security: no code runs from a file we read, Ray stays on the loopback address, and result
files are never left half-written."""

from __future__ import annotations

import ast
import os
import pickle
import socket
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import autoshrink
from autoshrink.record import State
from autoshrink.space import SearchSpace, SpaceError

PACKAGE = Path(autoshrink.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the loader runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Payload(marker), "accuracy": 99.0}, path)
    return path


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


# -- reading files ---------------------------------------------------------------------------
def test_every_torch_load_in_the_package_is_weights_only():
    found = []
    for path in SOURCES:
        for call, name in _calls(ast.parse(path.read_text(), str(path))):
            if name == "torch.load":
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                found.append((f"{path.relative_to(PACKAGE)}:{call.lineno}", ok))
    assert found, "expected the package to load checkpoints somewhere"
    assert [where for where, ok in found if not ok] == []


def test_the_package_never_unpickles_or_evaluates_text():
    banned = {"pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "yaml.load",
              "yaml.unsafe_load", "yaml.full_load", "eval", "exec", "torch.jit.load", "marshal.loads"}
    hits = [f"{p.relative_to(PACKAGE)}:{c.lineno}: {name}"
            for p in SOURCES for c, name in _calls(ast.parse(p.read_text(), str(p))) if name in banned]
    assert hits == []


def test_the_crafted_payload_does_run_code_when_loaded_unsafely(tmp_path):
    # the control for the tests below: the payload is live
    marker = tmp_path / "pwned"
    torch.load(_crafted(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


def test_a_crafted_logits_cache_is_refused_and_recomputed(tmp_path, monkeypatch):
    from autoshrink.compress import distill

    monkeypatch.setenv("AUTOSHRINK_CACHE", str(tmp_path / "cache"))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    data = TensorDataset(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))
    marker = tmp_path / "pwned"
    cached = _crafted(distill._logits_path(model, data), marker)
    logits = distill.teacher_logits(model, data)
    assert not marker.exists()
    assert logits.shape == (8, 3)
    assert torch.equal(torch.load(cached, weights_only=True), logits)  # replaced by the real thing


def test_a_crafted_teacher_checkpoint_is_refused(tmp_path, monkeypatch):
    from autoshrink.tasks import digits

    class WouldTrain(Exception):
        pass

    def no_training(*args, **kwargs):
        raise WouldTrain  # refusing the file by retraining is fine too; just not here

    small = TensorDataset(torch.randn(4, 1, 32, 32), torch.arange(4))
    monkeypatch.setenv("AUTOSHRINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digits, "digits_data", lambda: digits.DigitsData(small, small))
    monkeypatch.setattr(digits, "train_teacher", no_training)
    marker = tmp_path / "pwned"
    _crafted(digits._teacher_path("resnet20", 1), marker)
    with pytest.raises((pickle.UnpicklingError, WouldTrain, autoshrink.TaskError),
                       match=r"cannot be loaded safely|Weights only|^$"):
        digits.digits_task("resnet20", epochs=1, progress=False)
    assert not marker.exists()


def test_a_crafted_model_checkpoint_is_refused(tmp_path):
    custom = pytest.importorskip("autoshrink.tasks.custom")
    marker = tmp_path / "pwned"
    ckpt = _crafted(tmp_path / "model.pt", marker)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(autoshrink.TaskError, match=r"--checkpoint .*model\.pt: cannot be loaded with "
                                                   r"weights_only=True"):
        custom.load_checkpoint(net, ckpt, model="mynet:build")
    assert not marker.exists()


def test_crafted_cifar10_batches_are_refused(tmp_path):
    from autoshrink.data import read_cifar10

    marker = tmp_path / "pwned"
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (root / name).write_bytes(pickle.dumps({b"data": _Payload(marker), b"label_names": _Payload(marker)}))
    with pytest.raises(autoshrink.TaskError, match=r"cifar10:.*(refusing|not a CIFAR-10)"):
        read_cifar10(root)
    assert not marker.exists()


def test_yaml_is_read_with_a_safe_loader(tmp_path):
    marker = tmp_path / "pwned"
    space = tmp_path / "space.yaml"
    space.write_text(f"layers: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(SpaceError, match="could not determine a constructor for the tag"):
        SearchSpace.from_yaml(space)
    assert not marker.exists()


@pytest.mark.parametrize("factory", [
    "__import__('os').system('touch {marker}')",
    "os:system('touch {marker}')",
    "builtins:exec",
])
def test_the_model_factory_is_only_imported_never_evaluated(factory, tmp_path, monkeypatch, capsys):
    pytest.importorskip("autoshrink.tasks.custom")
    from autoshrink.cli import main

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "data").mkdir()
    code = main(["sensitivity", "--model", factory.format(marker=marker),
                 "--data", f"imagefolder:{tmp_path / 'data'}"])
    assert code == 2, capsys.readouterr().err
    assert not marker.exists()


# -- Ray -------------------------------------------------------------------------------------
def test_ray_init_asks_for_loopback_and_no_dashboard():
    tree = ast.parse((PACKAGE / "search" / "ray_backend.py").read_text())
    calls = [c for c, name in _calls(tree) if name == "ray.init"]
    local = [{k.arg: ast.literal_eval(k.value) for k in c.keywords if isinstance(k.value, ast.Constant)}
             for c in calls]
    local = [kw for kw in local if kw.get("address") == "local"]  # never someone else's cluster
    assert local, "search/ray_backend.py starts a local Ray"
    for kw in local:
        assert kw.get("include_dashboard") is False
        assert kw.get("_node_ip_address") == "127.0.0.1"


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, local address, port) of every TCP socket those processes listen on (Linux /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            parts = row.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc stores each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((inodes[inode], socket.inet_ntop(family, raw), int(hex_port, 16)))
    return found


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_ray_we_start_listens_on_loopback_only(tmp_path, no_ray):
    import ray

    from autoshrink.budget import Budget
    from autoshrink.search import CLUSTER_MODE_VAR, Driver, DriverConfig, TrialSettings

    if ray.is_initialized():
        pytest.skip("a Ray runtime is already up in this process")
    before = os.environ.get(CLUSTER_MODE_VAR)
    config = DriverConfig(budget=Budget(), out=tmp_path, settings=TrialSettings(latency_runs=10))
    driver = Driver(task=None, space=None, study=None, config=config)
    driver.start_ray()
    try:
        assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker is up and listening too
        addresses = _listening(_descendants(os.getpid()) | {os.getpid()})
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    finally:
        driver.close()
    assert os.environ.get(CLUSTER_MODE_VAR) == before  # our setting does not leak
    assert addresses, "found none of Ray's listening sockets"
    exposed = [(pid, a, port) for pid, a, port in addresses
               if a not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert exposed == []
    assert 8265 not in {port for _, _, port in addresses}  # and no dashboard


# -- writing files ---------------------------------------------------------------------------
def _failing_to_csv(self, path, *args, **kwargs):
    Path(path).write_text("number,state\n0,COMP")  # half a file, then the disk fills up
    raise OSError(28, "No space left on device")


def test_a_failed_csv_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    from autoshrink.report import write_csv_atomic

    target = tmp_path / "trials.csv"
    pd.DataFrame({"number": [0, 1], "state": [State.COMPLETE, State.FAIL]}).to_csv(target, index=False)
    before = target.read_text()
    monkeypatch.setattr(pd.DataFrame, "to_csv", _failing_to_csv)
    with pytest.raises(OSError, match="No space left"):
        write_csv_atomic(pd.DataFrame({"number": [0, 1, 2]}), target)
    assert target.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trials.csv"]  # no temporary left


def test_a_failed_result_write_leaves_no_partial_trials_csv(tmp_path, monkeypatch):
    from autoshrink.result import SearchResult

    monkeypatch.setattr(pd.DataFrame, "to_csv", _failing_to_csv)
    result = SearchResult(out=tmp_path, trials=pd.DataFrame({"number": [0], "state": [State.COMPLETE]}))
    with pytest.raises(OSError):
        result.write()
    assert list(tmp_path.iterdir()) == []


def test_small_result_files_are_replaced_whole(tmp_path, monkeypatch):
    from autoshrink._files import atomic_path, write_text_atomic

    real = Path.write_text

    def half(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    def torch_like(path, text):  # a writer that takes a path, as torch.save and savefig do
        with atomic_path(path) as tmp:
            tmp.write_text(text)

    for write in (write_text_atomic, torch_like):
        target = tmp_path / "candidate.json"
        target.write_text('{"old": true}')

        monkeypatch.setattr(Path, "write_text", half)
        with pytest.raises(OSError):
            write(target, '{"new": "a longer text than before"}')
        monkeypatch.undo()
        assert target.read_text() == '{"old": true}'
        assert [p.name for p in tmp_path.iterdir()] == ["candidate.json"]

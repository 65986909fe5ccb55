"""Bad input: every case is one line on stderr naming the problem, exit code 2, no traceback.

None of these cases builds a built-in task (that would train a ResNet-18 teacher): each fails on
arguments, files or run folders before any model is made, or uses a small model of its own.
"""

from __future__ import annotations

import os
import re

import optuna
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import autoshrink as ash
from autoshrink.cli import main
from autoshrink.record import STUDY_DIRECTIONS, StudyAttr, TrialAttr
from autoshrink.search import SearchError

TINY_SPACE = """\
name: tiny
layers:
  - {name: stage1, pattern: "layer1.*", bits: [4, 8], prune: [0.0, 0.5]}
finetune: {steps: 10, lr: 0.01, batch_size: 32}
"""


def _study(folder, *, fingerprint: str | None = None, trials: int = 1, budget: dict | None = None):
    """A run folder holding a study with ``trials`` COMPLETE trials (no saved models)."""
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{folder / 'study.db'}", study_name="autoshrink",
                                directions=STUDY_DIRECTIONS)
    if fingerprint is not None:
        study.set_user_attr(StudyAttr.SPACE_FINGERPRINT, fingerprint)
        study.set_user_attr(StudyAttr.SPACE_SOURCE, "old.yaml")
    if budget is not None:
        study.set_user_attr(StudyAttr.BUDGET, budget)
    for _ in range(trials):
        t = study.ask()
        for key, value in {TrialAttr.ACCURACY: 90.0, TrialAttr.LATENCY_MS: 1.0, TrialAttr.SIZE_MB: 0.1,
                           TrialAttr.MEETS_BUDGET: True}.items():
            t.set_user_attr(key, value)
        study.tell(t, [90.0, 1.0])
    return folder


def _file(path, text: str):
    path.write_text(text)
    return str(path)


# (id, argv builder, pattern the one error line must match)
CASES = [
    ("yaml-syntax", lambda d: ["search", "--budget-ms", "5", "--space",
                               _file(d / "bad.yaml", "layers:\n  - pattern: 'x'\n bits: [8]\n")],
     r"bad\.yaml:\d+:\d+: YAML syntax error"),
    ("yaml-unknown-key", lambda d: ["search", "--budget-ms", "5", "--space",
                                    _file(d / "s.yaml", "layers:\n  - {pattern: '*', bitz: [8]}\n")],
     r"s\.yaml: layers\[0\]\.bitz: unknown key"),
    ("yaml-bits-not-allowed", lambda d: ["search", "--budget-ms", "5", "--space",
                                         _file(d / "s.yaml", "layers:\n  - {pattern: '*', bits: [3, 8]}\n")],
     r"s\.yaml: layers\[0\]\.bits: 3 is not one of \[4, 8, 32\]"),
    ("yaml-ratio-outside", lambda d: ["search", "--budget-ms", "5", "--space",
                                      _file(d / "s.yaml", "layers:\n  - {pattern: '*', prune: [0.5, 1.0]}\n")],
     r"s\.yaml: layers\[0\]\.prune: 1\.0 is outside \[0, 1\)"),
    ("yaml-range-outside", lambda d: ["search", "--budget-ms", "5", "--space",
                                      _file(d / "s.yaml",
                                            "layers:\n  - {pattern: '*', prune: {low: 0.0, high: 1.5}}\n")],
     r"s\.yaml: layers\[0\]\.prune: range \[0\.0, 1\.5\] must lie within \[0, 1\)"),
    ("yaml-top-level-list", lambda d: ["search", "--budget-ms", "5", "--space",
                                       _file(d / "s.yaml", "- pattern: '*'\n")],
     r"s\.yaml: the top level must be a mapping, got list"),
    ("yaml-duplicate-rule", lambda d: ["search", "--budget-ms", "5", "--space",
                                       _file(d / "s.yaml", "layers:\n  - {name: a, pattern: 'x*'}\n"
                                                           "  - {name: a, pattern: 'y*'}\n")],
     r"s\.yaml: layers: rule names must be unique, repeated: \['a'\]"),
    ("yaml-python-tag", lambda d: ["search", "--budget-ms", "5", "--space",
                                   _file(d / "s.yaml", "layers: !!python/object/apply:os.system ['true']\n")],
     r"s\.yaml:\d+:\d+: YAML syntax error: could not determine a constructor for the tag "
     r"'tag:yaml\.org,2002:python/object/apply:os\.system'"),
    ("space-missing", lambda d: ["search", "--budget-ms", "5", "--space", str(d / "nope.yaml")],
     r"nope\.yaml: search space file not found"),
    ("budget-negative", lambda d: ["search", "--budget-ms", "-1"],
     r"autoshrink search: error: argument --budget-ms: must be > 0, got -1"),
    ("budget-zero", lambda d: ["search", "--budget-mb", "0"],
     r"argument --budget-mb: must be > 0, got 0"),
    ("budget-not-a-number", lambda d: ["search", "--budget-ms", "fast"],
     r"argument --budget-ms: 'fast' is not a number"),
    ("no-budget", lambda d: ["search"],
     r"give a budget \(--budget-ms, --budget-mb, --budget-mmacs\) or --max-drop"),
    ("minutes-negative", lambda d: ["search", "--budget-ms", "5", "--minutes", "-1"],
     r"argument --minutes: must be >= 0, got -1"),
    ("trials-zero", lambda d: ["search", "--budget-ms", "5", "--trials", "0"],
     r"argument --trials: must be > 0, got 0"),
    ("workers-zero", lambda d: ["search", "--budget-ms", "5", "--workers", "0"],
     r"argument --workers: must be > 0, got 0"),
    ("unknown-sampler", lambda d: ["search", "--budget-ms", "5", "--sampler", "cmaes"],
     r"argument --sampler: invalid choice: 'cmaes' \(choose from .*tpe.*\)"),
    ("unknown-task", lambda d: ["search", "--budget-ms", "5", "--task", "digitz"],
     r"unknown task 'digitz'; built-in tasks: \[.*\]\. Did you mean 'digits'\?"),
    ("unknown-command", lambda d: ["serach"],
     r"autoshrink: error: argument COMMAND: invalid choice: 'serach'"),
    ("resume-without-out", lambda d: ["search", "--budget-ms", "5", "--resume"],
     r"--resume needs --out DIR"),
    ("resume-no-study", lambda d: ["search", "--budget-ms", "5", "--resume", "--out", str(d / "empty")],
     r"--resume: '.*empty' holds no search \(no study\.db\); start a new search without --resume"),
    ("resume-storage-no-study", lambda d: ["search", "--budget-ms", "5", "--resume", "--out", str(d / "r"),
                                           "--storage", f"sqlite:///{d / 'other.db'}"],
     r"--resume: no study 'autoshrink' in the run folder '.*r'; start a new search without --resume"),
    ("resume-other-space", lambda d: ["search", "--budget-ms", "5", "--resume",
                                      "--out", str(_study(d / "run", fingerprint="0000")),
                                      "--space", _file(d / "tiny.yaml", TINY_SPACE)],
     r"--resume: the study in '.*run' was made with a different search space \(old\.yaml, now "
     r".*tiny\.yaml\); use the same space or a new --out"),
    ("resume-other-budget", lambda d: ["search", "--budget-ms", "4", "--resume",
                                       "--out", str(_study(d / "run", budget={"latency_ms": 5.0}))],
     r"--resume: the study in '.*run' was made with the budget latency <= 5 ms, now latency <= 4 ms; "
     r"use the same budget or a new --out"),
    ("out-holds-a-search", lambda d: ["search", "--budget-ms", "5", "--out", str(_study(d / "run"))],
     r"'.*run' already holds a search \(1 trial\); pass --resume to continue it or choose another --out"),
    ("out-not-writable", lambda d: ["search", "--budget-ms", "5",
                                    "--out", str((d / "a-file").resolve() / "run")],
     r"out folder '.*a-file/run' is not writable: Not a directory"),
    ("export-no-study", lambda d: ["export", str(d), "-o", str(d / "x")],
     r"no study\.db here; is this an autoshrink run folder\?"),
    ("export-no-model", lambda d: ["export", str(_study(d / "run")), "--trial", "0", "-o", str(d / "x")],
     r"trial 0 has no saved model \(state COMPLETE\); only fine-tuned trials that met the budget "
     r"are saved"),
    ("export-no-such-trial", lambda d: ["export", str(_study(d / "run")), "--trial", "7", "-o", str(d / "x")],
     r"no trial 7 in .*run"),
    ("export-without-output", lambda d: ["export", str(d)],
     r"the following arguments are required: -o/--output"),
    ("pareto-no-study", lambda d: ["pareto", str(d / "missing")],
     r"missing: no study\.db here"),
]


@pytest.mark.parametrize("make_argv, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(make_argv, pattern, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default run folder would land here, never in the repo
    (tmp_path / "a-file").write_text("not a folder")
    argv = make_argv(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("autoshrink"), err
    assert re.search(pattern, lines[0]), lines[0]


# -- your own model and data: --model pkg.module:factory, --checkpoint, --data ------------------
NETS = """\
import torch
import torch.nn as nn


class Net(nn.Module):
    in_chans, img_size = 1, 8

    def __init__(self, num_classes=2, width=8):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class DataDependent(Net):
    def forward(self, x):
        y = torch.relu(self.conv(x))
        if y.sum() > 0:  # control flow on a value: torch.export cannot capture it
            y = y * 2
        return self.fc(y.mean((2, 3)))


def build(num_classes=2):
    return Net(num_classes)


def wide(num_classes=2):
    return Net(num_classes, width=16)


def data_dependent(num_classes=2):
    return DataDependent(num_classes)
"""
MODULE = "autoshrink_cli_test_nets"  # imported from the current folder, as a user's module is


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A folder as a user would have it: a module with model factories, checkpoints, images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("user")
    (root / f"{MODULE}.py").write_text(NETS)
    g = torch.Generator().manual_seed(0)
    for label in ("cat", "dog"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / "images" / label / f"{i}.png")
    (root / "empty").mkdir()
    torch.save(nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Linear(16, 2)).state_dict(),
               root / "other-arch.pt")
    (root / "corrupt.pt").write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    (root / "block9.yaml").write_text("layers:\n  - {pattern: 'block9.*', bits: [8]}\n")
    (root / "conv.yaml").write_text("layers:\n  - {pattern: 'conv', bits: [8], prune: [0.0, 0.5]}\n")
    (root / "head.yaml").write_text("layers:\n  - {pattern: 'conv', bits: [8]}\n  - {pattern: fc, prune: 0.5}\n")
    (root / "empty.pt").write_bytes(b"")
    return root


def _own(*args: str) -> list[str]:
    return ["search", "--model", f"{MODULE}:build", "--data", "imagefolder:images", "--no-progress",
            *args]


OWN_CASES = [
    ("pattern-matches-no-layer", _own("--budget-mmacs", "10", "--space", "block9.yaml", "--out", "r1"),
     r"block9\.yaml: layers\[0\]\.pattern: 'block9\.\*' matches no layer of the model \(its layers: "
     r"conv, fc\)"),
    ("budget-unreachable", _own("--budget-mmacs", "1e-6", "--space", "conv.yaml", "--out", "r2"),
     r"no configuration of the space .*conv\.yaml can meet the budget \(mmacs <= 1e-06 MMACs\): even "
     r"the cheapest one \(lowest bits, most pruning\) has mmacs 0\.0\d+ MMACs > 1e-06\. The minimum "
     r"achievable is about mmacs 0\.0\d+ MMACs: raise the budget or widen the space"),
    ("model-not-traceable", ["search", "--model", f"{MODULE}:data_dependent", "--data", "imagefolder:images",
                             "--budget-mmacs", "10", "--space", "conv.yaml", "--out", "r3"],
     r"the model cannot be captured by torch\.export, which quantization and the saved model need: "
     r".*express it with torch\.where or torch\.cond"),
    ("checkpoint-missing", _own("--budget-ms", "5", "--checkpoint", "nope.pt"),
     r"--checkpoint nope\.pt: no such file"),
    ("checkpoint-corrupt", _own("--budget-ms", "5", "--checkpoint", "corrupt.pt"),
     r"--checkpoint corrupt\.pt: (not a readable torch checkpoint|cannot be loaded with weights_only)"),
    ("checkpoint-other-architecture", _own("--budget-ms", "5", "--checkpoint", "other-arch.pt"),
     r"--checkpoint other-arch\.pt is for another architecture than --model "
     r"autoshrink_cli_test_nets:build: .*(missing|unexpected)"),
    ("checkpoint-other-width", _own("--budget-ms", "5", "--checkpoint", "wide.pt"),
     r"--checkpoint wide\.pt is for another architecture than --model autoshrink_cli_test_nets:build: "
     r"'conv\.weight' is \(16, 1, 3, 3\) in the checkpoint but \(8, 1, 3, 3\) in the model"),
    ("data-folder-missing", ["search", "--budget-ms", "5", "--model", f"{MODULE}:build",
                             "--data", "imagefolder:nowhere"],
     r"imagefolder:nowhere: no such folder"),
    ("data-folder-empty", ["search", "--budget-ms", "5", "--model", f"{MODULE}:build",
                           "--data", "imagefolder:empty"],
     r"imagefolder:empty: no class sub-folders \(expected empty/<class>/<image>\)"),
    ("data-unknown-scheme", ["search", "--budget-ms", "5", "--model", f"{MODULE}:build",
                             "--data", "folder:images"],
     r"--data 'folder:images': unknown data scheme 'folder'"),
    ("model-spec-malformed", ["search", "--budget-ms", "5", "--model", MODULE, "--data", "imagefolder:images"],
     r"--model 'autoshrink_cli_test_nets': expected pkg\.module:factory"),
    ("model-module-missing", ["search", "--budget-ms", "5", "--model", "no_such_module_xyz:build",
                              "--data", "imagefolder:images"],
     r"--model 'no_such_module_xyz:build': cannot import 'no_such_module_xyz'"),
    ("model-factory-missing", ["search", "--budget-ms", "5", "--model", f"{MODULE}:biuld",
                               "--data", "imagefolder:images"],
     r"has no 'biuld'\. Did you mean 'build'\?"),
    ("data-without-model", ["search", "--budget-ms", "5", "--data", "imagefolder:images"],
     r"--data 'imagefolder:images' needs --model pkg\.module:factory"),
    # issue 13
    ("checkpoint-empty", _own("--budget-ms", "5", "--checkpoint", "empty.pt"),
     r"--checkpoint empty\.pt is an empty file \(0 bytes\): was the save interrupted\?"),
    ("checkpoint-is-a-folder", _own("--budget-ms", "5", "--checkpoint", "empty"),
     r"--checkpoint empty is a folder, not a checkpoint file"),
    ("head-rule-prunes-own-model", _own("--budget-mmacs", "10", "--space", "head.yaml"),
     r"head\.yaml: layers\[1\]\.prune: 'fc' asks to prune \['fc'\], which are never pruned"),
    ("own-model-bad-storage", _own("--budget-mmacs", "10", "--space", "conv.yaml", "--storage", "notaurl"),
     r"--storage 'notaurl' is not a database URL"),
    ("own-model-ray-address", _own("--budget-mmacs", "10", "--space", "conv.yaml", "--ray-address", "127.0.0.1:1"),
     r"--ray-address 127\.0\.0\.1:1: nothing answers there within 3 s"),
]


@pytest.mark.parametrize("argv, pattern", [c[1:] for c in OWN_CASES], ids=[c[0] for c in OWN_CASES])
def test_bad_model_or_data_is_one_clear_line(argv, pattern, user_files, monkeypatch, capsys):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    monkeypatch.chdir(user_files)
    if not (user_files / "wide.pt").exists():  # a checkpoint of the same module, other width
        import importlib

        monkeypatch.syspath_prepend(str(user_files))
        torch.save(importlib.import_module(MODULE).wide().state_dict(), user_files / "wide.pt")
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


def test_there_are_at_least_twenty_cases():
    assert len(CASES) + len(OWN_CASES) >= 20


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SearchError, match="holds no search"):
        main(["--debug", "search", "--budget-ms", "5", "--resume", "--out", str(tmp_path / "empty")])


def test_help_is_not_an_error(capsys):
    assert main(["search", "--help"]) == 0
    assert "--budget-ms" in capsys.readouterr().out


# -- the same rules through the Python API, on small models of their own -------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class _DataDependent(_Net):
    def forward(self, x):
        y = torch.relu(self.conv(x))
        if y.sum() > 0:  # Python control flow on a tensor's value: torch.export cannot capture it
            y = y * 2
        return self.fc(y.mean((2, 3)))


def _task(model: nn.Module, shape=(1, 8, 8)) -> ash.Task:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, *shape, generator=g), torch.randint(0, 3, (32,), generator=g))
    return ash.Task(model=model, train_data=data, val_data=data, example_input=torch.randn(1, *shape))


def _space() -> ash.SearchSpace:
    return ash.SearchSpace.from_dict({"layers": [{"name": "conv", "pattern": "conv", "bits": [8, 32],
                                                  "prune": [0.0, 0.5]}]}, source="small.yaml")


def test_example_input_of_the_wrong_shape():
    data = TensorDataset(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ash.TaskError, match=r"does not accept example_input of shape \(1, 3, 8, 8\)"):
        ash.Task(model=_Net(), train_data=data, val_data=data, example_input=torch.randn(1, 3, 8, 8))


def test_empty_data_is_refused():
    data = TensorDataset(torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ash.TaskError, match="train_data is empty"):
        ash.Task(model=_Net(), train_data=data, val_data=data, example_input=torch.randn(1, 1, 8, 8))


def test_a_model_torch_export_cannot_capture_is_one_clear_error(tmp_path):
    with pytest.raises(ash.TaskError, match=r"cannot be captured by torch\.export.*control flow"):
        ash.search(_task(_DataDependent()), _space(), ash.Budget(mmacs=100.0), trials=1,
                   out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "study.db").exists()  # nothing was started


def test_a_pattern_that_matches_no_layer(tmp_path):
    space = ash.SearchSpace.from_dict({"layers": [{"pattern": "block9.*", "bits": [8]}]}, source="s.yaml")
    with pytest.raises(ash.SpaceError, match=r"s\.yaml: layers\[0\]\.pattern: 'block9\.\*' matches no "
                                             r"layer of the model \(its layers: conv, fc\)"):
        ash.search(_task(_Net()), space, ash.Budget(mmacs=1.0), trials=1, out=tmp_path, progress=False)


def test_a_budget_no_configuration_meets_names_the_minimum(tmp_path):
    with pytest.raises(SearchError, match=r"no configuration of the space small\.yaml can meet the budget "
                                          r"\(mmacs <= 1e-05 MMACs\): even the cheapest one .* has mmacs "
                                          r"0\.0\d+ MMACs > 1e-05\. The minimum achievable is about "
                                          r"mmacs 0\.0\d+ MMACs"):
        ash.search(_task(_Net()), _space(), ash.Budget(mmacs=1e-5), trials=1, out=tmp_path / "run",
                   progress=False)
    assert not (tmp_path / "run" / "study.db").exists()


def test_a_latency_budget_no_configuration_meets_names_the_minimum(tmp_path):
    with pytest.raises(SearchError, match=r"even the cheapest one .* has latency_ms \d.* ms > 1e-06\. "
                                          r"The minimum achievable is about latency_ms"):
        ash.search(_task(_Net()), _space(), ash.Budget(latency_ms=1e-6), trials=1, out=tmp_path / "run",
                   progress=False, latency_runs=10)


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"sampler": "cmaes"}, SearchError, r"unknown sampler 'cmaes'; choose one of \['tpe', 'nsga2'"),
    ({"trials": 0}, ValueError, r"trials must be a positive integer, got 0"),
    ({"workers": -1}, ValueError, r"workers must be a positive integer, got -1"),
    ({"resume": True}, SearchError, r"--resume: '.*new' holds no search"),
])
def test_search_arguments_are_checked_first(kwargs, error, pattern, tmp_path):
    with pytest.raises(error, match=pattern):
        ash.search(_task(_Net()), _space(), ash.Budget(mmacs=1.0), out=tmp_path / "new",
                   progress=False, **kwargs)


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match=r"budget latency_ms: -1 must be a positive number"):
        ash.Budget(latency_ms=-1)


# -- issue 13: a damaged store, storage URLs, YAML limits, flags that do not apply, paths, Ray --------
class Reached(BaseException):
    """Raised by the patched teacher training and ray.init: a bad input got past its check."""


@pytest.fixture()
def nothing_runs(monkeypatch):
    """Teacher training (built-in and custom tasks) and ray.init raise: each case must fail before."""
    import ray

    import autoshrink.tasks.digits as digits

    def reached(what):
        def raise_(*_a, **_k):
            raise Reached(what)
        return raise_

    monkeypatch.setattr(digits, "train_teacher", reached("the teacher trained"))
    monkeypatch.setattr(ray, "init", reached("ray.init was called"))


def _garbage(folder, data: bytes = b"not a database, just bytes " * 200):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.db").write_bytes(data)
    return str(folder)


def _truncated(folder):
    _study(folder, trials=3)
    db = folder / "study.db"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])  # what a full disk or a crash mid-write leaves
    return str(folder)


def _db_folder(folder):
    (folder / "study.db").mkdir(parents=True)
    return str(folder)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"b{i}: &b{i} [*{'a' if i == 0 else f'b{i - 1}'}, *{'a' if i == 0 else f'b{i - 1}'}]\n" for i in range(60))
_S = ["search", "--budget-ms", "5"]
_SPACE = "layers:\n  - {pattern: 'layer1.*', bits: [8]}\n"
DAMAGED = r"study\.db is not a database \(damaged\?\): move it away or start with a new --out"

NEW_CASES = [
    # a damaged or unreadable study.db: every command that opens the folder
    ("store-garbage-search", lambda d: [*_S, "--out", _garbage(d / "run")], DAMAGED),
    ("store-garbage-resume", lambda d: [*_S, "--resume", "--out", _garbage(d / "run")],
     r"--resume: .*study\.db is not a database \(damaged\?\).*`autoshrink recover .*run`"),
    ("store-truncated-search", lambda d: [*_S, "--out", _truncated(d / "run")],
     r"study\.db (is not a database|is damaged)"),
    ("store-truncated-resume", lambda d: [*_S, "--resume", "--out", _truncated(d / "run")],
     r"--resume: .*study\.db (is not a database|is damaged).*autoshrink recover"),
    ("store-is-a-folder", lambda d: [*_S, "--out", _db_folder(d / "run")],
     r"study\.db is a folder, not a database file"),
    ("store-garbage-show", lambda d: ["show", _garbage(d / "run")], DAMAGED),
    ("store-garbage-pareto", lambda d: ["pareto", _garbage(d / "run")], DAMAGED),
    ("store-garbage-export", lambda d: ["export", _garbage(d / "run"), "-o", str(d / "x")], DAMAGED),
    ("store-truncated-show", lambda d: ["show", _truncated(d / "run")], r"study\.db (is not a database|is damaged)"),
    ("store-truncated-export", lambda d: ["export", _truncated(d / "run"), "-o", str(d / "x")],
     r"study\.db (is not a database|is damaged)"),
    ("store-not-optuna", lambda d: ["show", str(_sqlite(d / "run"))],
     r"study\.db is an SQLite database but not an Optuna study"),
    # storage URLs
    ("storage-not-a-url", lambda d: [*_S, "--storage", "notaurl"],
     r"--storage 'notaurl' is not a database URL: write it as sqlite:///PATH/study\.db"),
    ("storage-sqlite-no-folder", lambda d: [*_S, "--storage", "sqlite:////nonexistent/dir/x.db"],
     r"--storage sqlite:////nonexistent/dir/x\.db: the folder /nonexistent/dir does not exist"),
    ("storage-unknown-kind", lambda d: [*_S, "--storage", "oracel://u@h/db"],
     r"unknown database kind 'oracel'"),
    ("storage-no-server", lambda d: [*_S, "--storage", "postgresql://u@127.0.0.1:1/db"],
     r"--storage postgresql://u@127\.0\.0\.1:1/db: (no PostgreSQL driver|cannot connect to the database server "
     r"at 127\.0\.0\.1:1)"),
    ("storage-garbage-file", lambda d: [*_S, "--storage", f"sqlite:///{_garbage(d / 'db')}/study.db"], DAMAGED),
    ("show-bad-storage", lambda d: ["show", str(d)], r"no study\.db here"),
    # YAML with limits, and messages that say what was written, bounded
    ("yaml-empty", lambda d: [*_S, "--space", _file(d / "s.yaml", "")], r"s\.yaml is empty: expected a YAML mapping"),
    ("yaml-only-comments", lambda d: [*_S, "--space", _file(d / "s.yaml", "# nothing\n")], r"s\.yaml is empty"),
    ("yaml-alias-bomb", lambda d: [*_S, "--space", _file(d / "s.yaml", BOMB)],
     r"s\.yaml:\d+:\d+: more than 100 YAML alias references \(\*name\): is this an alias bomb\?"),
    ("yaml-too-large", lambda d: [*_S, "--space", _file(d / "s.yaml", "# " + "x" * 1_100_000 + "\n")],
     r"s\.yaml is 1\.1 MB, over the 1 MB limit for a YAML file"),
    ("yaml-not-text", lambda d: [*_S, "--space", str(_bytes(d / "s.yaml", b"\xff\xfe\x00bits"))],
     r"s\.yaml: not a UTF-8 text \(YAML\) file"),
    ("yaml-is-a-folder", lambda d: [*_S, "--space", str(d)], r"is not a file"),
    ("yaml-bits-true", lambda d: [*_S, "--space", _file(d / "s.yaml", "layers:\n  - {pattern: '*', bits: true}\n")],
     r"s\.yaml: layers\[0\]\.bits: true is not one of \[4, 8, 32\]"),
    ("yaml-bits-true-in-list", lambda d: [*_S, "--space",
                                          _file(d / "s.yaml", "layers:\n  - {pattern: '*', bits: [8, true]}\n")],
     r"layers\[0\]\.bits: true is not one of \[4, 8, 32\]"),
    ("yaml-defaults-bits-false", lambda d: [*_S, "--space", _file(d / "s.yaml", _SPACE + "defaults: {bits: false}\n")],
     r"s\.yaml: defaults\.bits: false is not one of \[4, 8, 32\]"),
    ("yaml-batch-size-zero", lambda d: [*_S, "--space", _file(d / "s.yaml", _SPACE + "finetune: {batch_size: 0}\n")],
     r"s\.yaml: finetune\.batch_size: must be >= 1, got 0"),
    ("yaml-batch-size-zero-choice", lambda d: [*_S, "--space",
                                               _file(d / "s.yaml", _SPACE + "finetune: {batch_size: [32, 0]}\n")],
     r"s\.yaml: finetune\.batch_size: must be >= 1, got \[32, 0\]"),
    ("yaml-step-wider-than-range", lambda d: [*_S, "--space", _file(
        d / "s.yaml", "layers:\n  - {pattern: '*', prune: {low: 0.0, high: 0.5, step: 0.75}}\n")],
     r"s\.yaml: layers\[0\]\.prune: step 0\.75 is wider than the range 0\.0\.\.0\.5"),
    ("yaml-alpha-range", lambda d: [*_S, "--space",
                                    _file(d / "s.yaml", _SPACE + "distill: {alpha: {low: 0.3, high: 2.0}}\n")],
     r"s\.yaml: distill\.alpha: alpha must lie in \[0, 1\], got 0\.3\.\.2\.0$"),
    ("yaml-temperature-range", lambda d: [*_S, "--space",
                                          _file(d / "s.yaml",
                                                _SPACE + "distill: {temperature: {low: 0.0, high: 2.0}}\n")],
     r"distill\.temperature: temperature must be > 0, got 0\.0\.\.2\.0$"),
    ("yaml-huge-value-is-excerpted", lambda d: [*_S, "--space",
                                                _file(d / "s.yaml",
                                                      "layers:\n  - {pattern: '*', bits: '" + "x" * 5000 + "'}\n")],
     r"layers\[0\]\.bits: expected a value, a list of choices or a \{low, high\} range \(got 'x{10,80}\.\.\.\)$"),
    ("yaml-head-rule-prunes", lambda d: [*_S, "--space", _file(d / "s.yaml",
                                                               "layers:\n  - {pattern: 'layer1.*', bits: [8]}\n"
                                                               "  - {name: head, pattern: fc, prune: 0.5}\n")],
     r"s\.yaml: layers\[1\]\.prune: 'head' asks to prune \['fc'\], which are never pruned"),
    # numbers
    ("budget-inf", lambda d: ["search", "--budget-ms", "inf"],
     r"argument --budget-ms: must be a finite number > 0, got inf"),
    ("budget-nan", lambda d: ["search", "--budget-mb", "nan"],
     r"argument --budget-mb: must be a finite number > 0, got nan"),
    ("max-drop-inf", lambda d: ["search", "--max-drop", "inf"], r"argument --max-drop: must be a finite number > 0"),
    # flags that do not apply are errors, never ignored
    ("checkpoint-without-model", lambda d: [*_S, "--checkpoint", "x.pt"],
     r"--checkpoint x\.pt needs --model pkg\.module:factory \(the architecture to load it into\)"),
    ("num-classes-with-built-in", lambda d: [*_S, "--num-classes", "5"],
     r"--num-classes 5 applies to --model .*the built-in task 'digits' has its own"),
    ("plan-checkpoint-without-model", lambda d: ["plan", "--checkpoint", "x.pt"], r"--checkpoint x\.pt needs --model"),
    ("space-num-classes-built-in", lambda d: ["space", "--num-classes", "3"], r"--num-classes 3 applies to --model"),
    ("sensitivity-checkpoint-without-model", lambda d: ["sensitivity", "--checkpoint", "x.pt"],
     r"--checkpoint x\.pt needs --model"),
    ("sensitivity-bad-space-first", lambda d: ["sensitivity", "--space", _file(d / "bad.yaml", "layers: [\n"),
                                               "--narrow", str(d / "n.yaml")], r"bad\.yaml:\d+:\d+: YAML syntax error"),
    ("sensitivity-space-without-narrow", lambda d: ["sensitivity", "--space", _file(d / "s.yaml", _SPACE)],
     r"--space .*s\.yaml is read only to narrow it: add --narrow NARROWED\.yaml"),
    ("sensitivity-narrow-no-folder", lambda d: ["sensitivity", "--narrow", "nodir/n.yaml"],
     r"--narrow nodir/n\.yaml: the folder nodir does not exist"),
    ("sensitivity-narrow-under-a-file", lambda d: ["sensitivity", "--narrow", "a-file/n.yaml"],
     r"--narrow a-file/n\.yaml: the folder a-file is a file, not a folder"),
    ("sensitivity-plot-no-folder", lambda d: ["sensitivity", "--plot", "nodir/s.png"],
     r"--plot nodir/s\.png: the folder nodir does not exist"),
    ("sensitivity-csv-is-a-folder", lambda d: ["sensitivity", "--csv", str(d)], r"--csv .* is a folder: name a file"),
    # paths: -o names a folder; a bad path names its flag
    ("export-o-model-file", lambda d: ["export", str(_study(d / "run")), "-o", "x/model.pt2"],
     r"-o x/model\.pt2: -o names a folder \(model\.pt2 and its README are written into it\), not a model "
     r"file: use -o x/model$"),
    ("export-o-onnx-file", lambda d: ["export", str(_study(d / "run")), "-o", "m.onnx"]
     , r"-o m\.onnx: -o names a folder"),
    ("export-o-is-a-file", lambda d: ["export", str(_study(d / "run")), "-o", "a-file"],
     r"-o a-file is a file, not a folder"),
    ("export-o-under-a-file", lambda d: ["export", str(_study(d / "run")), "-o", "a-file/out"],
     r"-o a-file/out: a-file is a file, not a folder"),
    ("pareto-plot-no-folder", lambda d: ["pareto", str(_study(d / "run")), "--plot", "nodir/p.png"],
     r"--plot nodir/p\.png: the folder nodir does not exist"),
    ("pareto-html-under-a-file", lambda d: ["pareto", str(_study(d / "run")), "--html", "a-file/p.html"],
     r"--html a-file/p\.html: the folder a-file is a file"),
    # a Ray cluster that is not there: tried in seconds, before anything is built
    ("ray-address-nothing-there", lambda d: [*_S, "--ray-address", "127.0.0.1:1"],
     r"--ray-address 127\.0\.0\.1:1: nothing answers there within 3 s .*`ray start --head`"),
    ("ray-address-malformed", lambda d: [*_S, "--ray-address", "headnode"],
     r"--ray-address 'headnode': expected HOST:PORT"),
    ("ray-address-bad-port", lambda d: [*_S, "--ray-address", "10.0.0.1:99999"], r"expected HOST:PORT"),
]


def _sqlite(folder):
    import sqlite3

    folder.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(folder / "study.db")
    con.execute("CREATE TABLE notes (x)")
    con.commit()
    con.close()
    return folder


def _bytes(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make_argv, pattern", [c[1:] for c in NEW_CASES], ids=[c[0] for c in NEW_CASES])
def test_issue13_bad_input_fails_before_training_or_ray(make_argv, pattern, tmp_path, monkeypatch, capsys,
                                                        nothing_runs):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    argv = make_argv(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = main(argv)  # Reached (a BaseException) would propagate: teacher or Ray reached
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Range(" not in err and "[Errno" not in err
    assert len(lines[0]) < 600, lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing changed, nothing lost, nothing written (no x/model.pt2/ folder)
    assert not (tmp_path / "x").exists() and not (tmp_path / "runs").exists()


def test_issue13_has_thirty_new_cases():
    assert len(NEW_CASES) >= 30


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_store_is_one_line_for_every_command_and_nothing_else_is_lost(damage, tmp_path, monkeypatch,
                                                                               capsys, nothing_runs):
    """A run folder as a crash leaves it (trials/ with records, trials.csv, report.md, a saved
    model): each command names study.db and the fix (`autoshrink recover` where records exist),
    and no byte of any other file changes."""
    from autoshrink.recover import write_trial_record

    monkeypatch.chdir(tmp_path)
    run = _study(tmp_path / "run", trials=3)
    study = optuna.load_study(study_name="autoshrink", storage=f"sqlite:///{run / 'study.db'}")
    for t in study.trials:
        (run / "trials" / f"{t.number:04d}").mkdir(parents=True, exist_ok=True)
        (run / "trials" / f"{t.number:04d}" / "candidate.json").write_text("{}")
        write_trial_record(run, t, {"accuracy": 90.0})
    (run / "trials" / "0000" / "model.pt2").write_bytes(b"a saved model")
    for name in ("trials.csv", "report.md", "pareto.png"):
        (run / name).write_text(f"{name} of the run")
    db = run / "study.db"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3] if damage == "truncate" else os.urandom(len(data)))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    commands = {
        "search --resume": [*_S, "--resume", "--out", str(run)],
        "new search": [*_S, "--out", str(run)],
        "show": ["show", str(run)],
        "pareto": ["pareto", str(run)],
        "export": ["export", str(run), "--trial", "0", "-o", str(tmp_path / "x")],
    }
    for what, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == 2, what
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, (what, err)
        assert re.search(r"study\.db (is not a database \(damaged\?\)|is damaged)", err), (what, err)
        assert f"`autoshrink recover {run}` rebuilds it from trials/ (3 trial records)" in err, (what, err)
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, what
    assert not (tmp_path / "x").exists()
    assert main(["recover", str(run)]) == 0  # and then every command reads it again
    assert main(["show", str(run)]) == 0

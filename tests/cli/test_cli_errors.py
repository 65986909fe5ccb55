"""Bad input: every case is one line on stderr naming the problem, exit code 2, no traceback.

None of these cases builds a built-in task (that would train a ResNet-18 teacher): each fails on
arguments, files or run folders before any model is made, or uses a small model of its own.
"""

from __future__ import annotations

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
]


@pytest.mark.parametrize("argv, pattern", [c[1:] for c in OWN_CASES], ids=[c[0] for c in OWN_CASES])
def test_bad_model_or_data_is_one_clear_line(argv, pattern, user_files, monkeypatch, capsys):
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

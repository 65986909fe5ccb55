"""Bring your own task: ``--model pkg.module:factory --checkpoint FILE --data imagefolder:DIR``,
CIFAR-10 python batches, and one clear error for each bad input."""

from __future__ import annotations

import pickle
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import autoshrink as ash
from autoshrink.data import load_data, read_cifar10, read_imagefolder
from autoshrink.record import State
from autoshrink.task import TaskError
from autoshrink.tasks import custom
from autoshrink.tasks.imagefolder import ImageFolderDataset

CLASSES = ("cat", "dog", "eel")

# A user's module: a small net named like the default search space expects (conv1, layer1..4, fc).
HELPER = textwrap.dedent('''
    import torch.nn as nn
    import torch.nn.functional as F


    class Net(nn.Module):
        def __init__(self, num_classes=3, width=8):
            super().__init__()
            self.in_chans = 3
            self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
            self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
            self.layer2 = nn.Sequential(nn.Conv2d(width, 16, 3, stride=2, padding=1), nn.ReLU())
            self.layer3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
            self.layer4 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            x = F.relu(self.conv1(x))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(x.mean((2, 3)))


    def factory(num_classes=3):
        return Net(num_classes)


    def wide(num_classes=3):
        return Net(num_classes, width=16)
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``helper_<n>.py`` in a fresh folder that is the current directory, as a user would run
    ``autoshrink`` next to their code. Returns the module name."""
    name = f"helper_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(HELPER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the import adds the cwd; undo it after
    yield name
    sys.modules.pop(name, None)


def _imagefolder(root, per_class: int = 7, size=(12, 10)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (size[0], size[1], 3), dtype=np.uint8) + 60 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def _cifar(root, per_batch: int = 8):
    """The CIFAR-10 python layout: pickled dicts of bytes keys, uint8 (N, 3072) data."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
             "test_batch"]
    for i, name in enumerate(names):
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": f"batch {i}".encode(), b"labels": labels,
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"img{j}.png".encode() for j in range(per_batch)]}
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    meta = {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
            b"label_names": [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer",
                                                  "dog", "frog", "horse", "ship", "truck")]}
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return root


# -- data readers -----------------------------------------------------------------------------
def test_imagefolder_is_resized_split_and_normalised(tmp_path):
    # augment=False: training images get the deterministic eval transform the mean/std are taken on
    data = read_imagefolder(_imagefolder(tmp_path / "img"), in_chans=1, size=(16, 16), augment=False)
    assert data.classes == list(CLASSES)
    assert len(data.train) + len(data.val) == 21
    # stratified: every class is in both splits, the same way every time
    for split in (data.train, data.val):
        assert sorted(set(split.targets)) == [0, 1, 2]
    again = read_imagefolder(tmp_path / "img", in_chans=1, size=(16, 16), augment=False)
    assert again.val.paths == data.val.paths and again.digest == data.digest
    assert torch.equal(again.val[0][0], data.val[0][0])
    x, y = data.train[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    xs = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert abs(xs.mean().item()) < 1e-4 and abs(xs.std().item() - 1) < 0.05
    assert data.normalize == "train" and len(data.mean) == len(data.std) == 1
    rgb = read_imagefolder(tmp_path / "img", in_chans=3, size=(8, 8))
    assert rgb.train[0][0].shape == (3, 8, 8)


def test_cifar10_batches_are_read_safely(tmp_path):
    root = _cifar(tmp_path / "cifar")
    data = read_cifar10(root)
    assert (len(data.train), len(data.val)) == (40, 8)
    assert data.classes[0] == "airplane" and len(data.classes) == 10
    assert data.train[0][0].shape == (3, 32, 32)
    with open(root / "test_batch", "rb") as fh:
        raw = pickle.load(fh)  # the test's own file; the package never calls pickle.load
    assert torch.equal(data.val.tensors[0].reshape(8, -1), torch.from_numpy(raw[b"data"]))
    grey = load_data(f"cifar10:{root}", in_chans=1)
    assert grey.train[0][0].shape == (1, 32, 32)


def test_cifar10_parent_folder_is_accepted(tmp_path):
    _cifar(tmp_path / "cifar-10-batches-py")
    assert len(read_cifar10(tmp_path).train) == 40


def test_a_crafted_cifar_batch_runs_no_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    root = _cifar(tmp_path / "cifar")
    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": Payload(), b"labels": []}, fh, protocol=2)
    with pytest.raises(TaskError, match=r"data_batch_3: not a CIFAR-10 batch \(refusing to load "
                                        r"(builtins|io)\.open\)"):
        read_cifar10(root)
    assert not (tmp_path / "pwned").exists()


def test_data_errors_name_the_folder_and_the_reason(tmp_path):
    with pytest.raises(TaskError, match="unknown data scheme 'tfrecord'; use one of imagefolder:DIR"):
        load_data(f"tfrecord:{tmp_path}")
    with pytest.raises(TaskError, match="expected SCHEME:DIR"):
        load_data(str(tmp_path))
    with pytest.raises(TaskError, match=r"imagefolder:.*missing: no such folder"):
        load_data(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskError, match="no class sub-folders"):
        load_data(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "empty" / "cat").mkdir()
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(TaskError, match="class folder 'cat' has no images"):
        load_data(f"imagefolder:{tmp_path / 'empty'}")
    root = _imagefolder(tmp_path / "img")
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(TaskError, match=r"cannot read .*broken\.png"):
        data = load_data(f"imagefolder:{root}")  # streamed: found when read (or by the mean/std sample)
        for split in (data.train, data.val):
            for i in range(len(split)):
                split[i]
    with pytest.raises(TaskError, match=r"not the CIFAR-10 python layout, missing \['data_batch_1'"):
        load_data(f"cifar10:{root}")
    with pytest.raises(TaskError, match="can feed 1 \\(greyscale\\) or 3 \\(RGB\\)"):
        load_data(f"imagefolder:{root}", in_chans=4)


# -- model, checkpoint, task ------------------------------------------------------------------
def test_factory_checkpoint_and_imagefolder_make_a_task(tmp_path, user_module):
    root = _imagefolder(tmp_path / "img")
    net = custom.build_model(f"{user_module}:factory")
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "net.pt")
    task = custom.task_from_cli(f"{user_module}:factory", str(tmp_path / "net.pt"),
                                f"imagefolder:{root}", None, None)
    assert task.num_classes == 3 and task.example_input.shape == (1, 3, 32, 32)
    assert isinstance(task.train_data, ImageFolderDataset)
    for a, b in zip(task.model.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a raw state_dict, a DataParallel one, and num_classes passed to the factory
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "dp.pt")
    custom.task_from_cli(f"{user_module}:factory", str(tmp_path / "dp.pt"), f"imagefolder:{root}",
                         None, 3)


def test_model_and_checkpoint_errors_are_one_line(tmp_path, user_module):
    root = _imagefolder(tmp_path / "img")
    data = f"imagefolder:{root}"
    good = tmp_path / "net.pt"
    torch.save(custom.build_model(f"{user_module}:factory").state_dict(), good)

    def build(model=f"{user_module}:factory", checkpoint=str(good), num_classes=None, data=data):
        return custom.task_from_cli(model, checkpoint, data, None, num_classes)

    with pytest.raises(TaskError, match=r"--checkpoint .*nope\.pt: no such file"):
        build(checkpoint=str(tmp_path / "nope.pt"))
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TaskError, match=r"corrupt\.pt: not a readable torch checkpoint"):
        build(checkpoint=str(tmp_path / "corrupt.pt"))
    torch.save(nn.Linear(3, 3), tmp_path / "whole.pt")
    with pytest.raises(TaskError, match=r"whole\.pt: cannot be loaded with weights_only=True"):
        build(checkpoint=str(tmp_path / "whole.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(TaskError, match=r"list\.pt: expected a state_dict"):
        build(checkpoint=str(tmp_path / "list.pt"))
    torch.save(custom.build_model(f"{user_module}:wide").state_dict(), tmp_path / "wide.pt")
    with pytest.raises(TaskError, match=r"wide\.pt is for another architecture than --model "
                                        r".*'conv1.weight' is \(16, 3, 3, 3\) in the checkpoint "
                                        r"but \(8, 3, 3, 3\) in the model"):
        build(checkpoint=str(tmp_path / "wide.pt"))
    torch.save(custom.build_model(f"{user_module}:factory", num_classes=5).state_dict(),
               tmp_path / "five.pt")
    with pytest.raises(TaskError, match=r"a different --num-classes \(the checkpoint has 5\)"):
        build(checkpoint=str(tmp_path / "five.pt"))
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(TaskError, match=r"missing \['conv1.weight', .*unexpected \['encoder.weight'\]"):
        build(checkpoint=str(tmp_path / "other.pt"))
    with pytest.raises(TaskError, match=f"module '{user_module}' .* has no 'factroy'. "
                                        "Did you mean 'factory'"):
        build(model=f"{user_module}:factroy")
    with pytest.raises(TaskError, match="cannot import 'no_such_pkg.mod'"):
        build(model="no_such_pkg.mod:factory")
    with pytest.raises(TaskError, match="expected pkg.module:factory"):
        build(model="factory")
    with pytest.raises(TaskError, match="the model outputs 5 classes but the data has 3"):
        build(checkpoint=None, num_classes=5)
    with pytest.raises(TaskError, match="--num-classes 3: autoshrink.models:list_models takes no "
                                        "num_classes"):
        build(model="autoshrink.models:list_models", checkpoint=None, num_classes=3)
    with pytest.raises(TaskError, match="--model needs --data"):
        build(data=None)
    with pytest.raises(TaskError, match="needs --model pkg.module:factory"):
        custom.task_from_cli(None, None, data, None, None)
    with pytest.raises(TaskError, match="--task cifar10 needs --data cifar10:DIR"):
        custom.task_from_cli(None, None, None, "cifar10", None)
    with pytest.raises(TaskError, match="needs its data: --data cifar10:DIR"):
        ash.tasks.get("cifar10")


def test_cifar10_task_trains_and_caches_its_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSHRINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AUTOSHRINK_TEACHER_EPOCHS", "1")
    root = _cifar(tmp_path / "cifar")
    task = custom.task_from_cli(None, None, f"cifar10:{root}", "cifar10", None)
    assert task.name == "cifar10" and task.num_classes == 10
    assert task.example_input.shape == (1, 3, 32, 32)
    cached = list((tmp_path / "cache" / "teachers").glob("cifar10-resnet20-*.pt"))
    assert len(cached) == 1
    trained = {k: v.clone() for k, v in task.model.state_dict().items()}
    again = ash.tasks.get("cifar10", data=f"cifar10:{root}", progress=False)  # from the cache
    assert all(torch.equal(trained[k], v) for k, v in again.model.state_dict().items())
    assert again.teacher_accuracy == task.teacher_accuracy


def test_loading_a_factory_leaves_pickling_of_autoshrink_alone():
    # a factory from an installed package (autoshrink's own zoo here) must not make cloudpickle
    # send autoshrink's classes by value: a process that unpickles them would get look-alike
    # classes that fail isinstance checks (a CI failure: "not SearchSpace")
    import cloudpickle
    from ray import cloudpickle as ray_cloudpickle

    custom.load_factory("autoshrink.models:create")
    for pickler in (cloudpickle, ray_cloudpickle):
        assert len(pickler.dumps(ash.SearchSpace)) < 200  # a reference, not the class's code


def test_dataloaders_work_as_task_data():
    from autoshrink.tasks.digits import digits_data
    from autoshrink.trial import TrialContext, evaluate

    torch.manual_seed(0)
    data = digits_data()
    x, y = data.train.tensors[0][:1024], data.train.tensors[1][:1024]
    xv, yv = data.val.tensors[0][:200], data.val.tensors[1][:200]
    model = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(100):  # ~50 % on held-out digits
        xb, yb = x[(i * 64) % 1024:][:64], y[(i * 64) % 1024:][:64]
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    task = ash.Task(model=model.eval(),
                    train_data=DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True),
                    val_data=DataLoader(TensorDataset(xv, yv), batch_size=64),
                    example_input=xv[:1])
    teacher, _ = task.evaluate(task.model)
    assert teacher > 30  # well above chance (10 %): the loaders feed the right pairs
    result = evaluate(task, ash.Candidate.uniform(bits=8, prune=0.25, steps=10, batch_size=32),
                      ash.Budget(), TrialContext(latency_runs=0))
    assert result.state is State.COMPLETE and result.accuracy is not None
    assert result.accuracy > teacher - 20


# the CLI's real search of a --model runs always in tests/cli/test_cli_sigterm.py, image folders in
# tests/tasks/test_imagefolder.py
@pytest.mark.heavy
@pytest.mark.own_ray
def test_cli_search_with_a_user_model(tmp_path, user_module):
    from autoshrink.cli import main

    root = _imagefolder(tmp_path / "img", per_class=10)
    torch.manual_seed(0)
    torch.save(custom.build_model(f"{user_module}:factory").state_dict(), tmp_path / "net.pt")
    code = main(["search", "--model", f"{user_module}:factory", "--checkpoint",
                 str(tmp_path / "net.pt"), "--data", f"imagefolder:{root}", "--trials", "1",
                 "--budget-ms", "1000", "--workers", "1", "--no-progress", "--out",
                 str(tmp_path / "run")])
    assert code == 0
    df = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert len(df) == 1 and df.loc[0, "state"] == State.COMPLETE, df.to_dict("records")

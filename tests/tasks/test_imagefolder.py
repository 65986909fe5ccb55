"""``imagefolder:DIR`` is streamed: only the file list is read up front, images are decoded when
iterated, and memory does not grow with the number of images."""

from __future__ import annotations

import pickle
import tracemalloc

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from autoshrink.data import load_data, read_imagefolder
from autoshrink.task import TaskError
from autoshrink.tasks.imagefolder import IMAGENET_MEAN, IMAGENET_STD, STATS_SAMPLE, ImageFolderDataset
from autoshrink.tasks.transforms import EvalTransform


def _folder(root, n: int, classes=("ant", "bee"), size=(12, 16)):
    """``n`` small images over ``classes``, PNG and JPEG alternating, class-dependent brightness."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % len(classes)
        pixels = (rng.integers(0, 100, (*size, 3)) + 100 * c).astype(np.uint8)
        suffix = "png" if i % 2 == 0 else "jpg"
        Image.fromarray(pixels).save(root / classes[c] / f"{i:05d}.{suffix}")
    return root


@pytest.fixture
def opens(monkeypatch):
    """Counts PIL.Image.open calls."""
    from PIL import Image

    calls = []
    real = Image.open

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return calls


def test_no_image_is_opened_before_iteration(tmp_path, opens):
    root = _folder(tmp_path / "img", 60)
    data = read_imagefolder(root, size=(224, 224), normalize="imagenet", num_workers=0)
    assert opens == []  # only the file list was read
    assert len(data.train) + len(data.val) == 60 and data.classes == ["ant", "bee"]
    loader = DataLoader(data.train, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    x, y = next(batches)
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.long
    assert len(opens) == 4  # one per image read
    next(batches)
    assert len(opens) == 8
    vx, _ = next(iter(DataLoader(data.val, batch_size=3)))
    assert vx.shape == (3, 3, 224, 224) and len(opens) == 11


def test_the_normalisation_sample_is_bounded_and_recorded(tmp_path, opens):
    root = _folder(tmp_path / "img", 400)
    data = read_imagefolder(root, size=(48, 48), num_workers=0)  # normalize="train"
    assert len(opens) == STATS_SAMPLE < len(data.train)  # a fixed sample, not the folder
    assert data.normalize == "train" and len(data.mean) == len(data.std) == 3
    again = read_imagefolder(root, size=(48, 48), num_workers=0)
    assert (again.mean, again.std) == (data.mean, data.std)  # seeded sample: the same estimate
    assert "mean [" in data.description and "streamed from disk" in data.description
    # the eval transform of (every 5th) training image, standardised by it, is ~N(0, 1) per channel
    samples = list(zip(data.train.paths, data.train.targets, strict=True))[::5]
    plain = ImageFolderDataset(samples, EvalTransform(48), mean=data.mean, std=data.std)
    xs = torch.stack([plain[i][0] for i in range(len(plain))])
    assert xs.mean().abs() < 0.15 and abs(xs.std() - 1) < 0.15
    imnet = read_imagefolder(root, size=(32, 32), normalize="imagenet")
    assert (imnet.mean, imnet.std, imnet.normalize) == (IMAGENET_MEAN, IMAGENET_STD, "imagenet")
    grey = read_imagefolder(root, in_chans=1, size=(32, 32), normalize="imagenet")
    assert grey.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,)) and grey.train[0][0].shape == (1, 32, 32)


def _peak(root, n_batches: int = 3) -> int:
    tracemalloc.start()
    try:
        data = read_imagefolder(root, size=(224, 224), normalize="imagenet", num_workers=0)
        for i, _batch in enumerate(DataLoader(data.train, batch_size=8, shuffle=True)):
            if i + 1 >= n_batches:
                break
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_folder(tmp_path):
    small = _folder(tmp_path / "small", 200)
    large = _folder(tmp_path / "large", 2000)
    _peak(small, 1), _peak(large, 1)  # first reads fill one-off caches: outside the measurement
    peak_small, peak_large = _peak(small), _peak(large)
    # each of the 1,800 extra images costs its file-list entry (~0.5 KB: path, label), not its
    # pixels (150 KB decoded at 224x224 in uint8; the whole folder ~300 MB)
    per_image = (peak_large - peak_small) / 1800
    assert per_image < 2048, (peak_small, peak_large)
    assert peak_large < 2000 * 3 * 224 * 224 / 100, peak_large


def test_augmented_batches_are_seeded_also_with_workers(tmp_path):
    data = read_imagefolder(_folder(tmp_path / "img", 40), size=(24, 24), normalize="imagenet", num_workers=1)

    def first(seed: int, global_seed: int, workers: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        loader = DataLoader(data.train, batch_size=6, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(seed))
        return next(iter(loader))[0]

    assert torch.equal(first(0, 0, 0), first(0, 0, 0))  # in-process: the torch seed decides
    with_workers = first(3, 0, 1)
    assert torch.equal(with_workers, first(3, 99, 1))  # a worker is seeded from the loader's generator
    assert not torch.equal(with_workers, first(4, 0, 1))


def test_streamed_data_travels_and_errors_name_the_file(tmp_path):
    root = _folder(tmp_path / "img", 20)
    data = read_imagefolder(root, size=(16, 16), normalize="imagenet")
    copy = pickle.loads(pickle.dumps(data.val))  # what Ray ships to a worker: paths, not pixels
    assert torch.equal(copy[0][0], data.val[0][0]) and copy.paths == data.val.paths
    assert all(p.startswith("/") for p in data.train.paths)  # absolute: workers may run elsewhere
    (root / "bee" / "zz-broken.png").write_bytes(b"not a png")
    broken = read_imagefolder(root, size=(16, 16), normalize="imagenet")
    split = broken.train if any("zz-broken" in p for p in broken.train.paths) else broken.val
    index = next(i for i, p in enumerate(split.paths) if "zz-broken" in p)
    with pytest.raises(TaskError, match=r"imagefolder:.*img: cannot read .*zz-broken\.png"):
        split[index]
    with pytest.raises(TaskError, match=r"--normalize 'cifar': expected one of \['train', 'imagenet'\]"):
        load_data(f"imagefolder:{root}", normalize="cifar")
    with pytest.raises(ValueError, match="num_workers"):
        read_imagefolder(root, num_workers=-1)


@pytest.mark.slow
def test_a_224_model_on_a_folder_of_thousands_of_images_end_to_end(tmp_path):
    """One real trial (prune + int8 QAT fine-tune + lowered int8 accuracy) of a 224x224 model on
    2,000 streamed images."""
    import torch.nn as nn

    from autoshrink import Budget, Candidate
    from autoshrink.tasks.custom import custom_task
    from autoshrink.trial import State, TrialContext, evaluate

    class Net(nn.Module):
        default_cfg = {"input_size": (3, 224, 224)}

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 7, stride=4, padding=3)
            self.bn1 = nn.BatchNorm2d(8)
            self.layer1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=4, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.fc = nn.Linear(16, 2)

        def forward(self, x):
            x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    root = _folder(tmp_path / "img", 2000)
    task = custom_task(Net().eval(), f"imagefolder:{root}", num_workers=0)
    assert task.example_input.shape == (1, 3, 224, 224) and len(task.val_data) == 400
    teacher, _ = task.evaluate(task.model, batch_size=100)
    result = evaluate(task, Candidate.uniform(bits=8, prune=0.25, steps=4, batch_size=8), Budget(),
                      TrialContext(latency_runs=0))
    assert result.state == State.COMPLETE and result.accuracy is not None, result.error
    assert 0.0 <= result.accuracy <= 100.0 and 0.0 <= teacher <= 100.0
    assert result.layers and result.layers[0]["channels_after"] < result.layers[0]["channels_before"]

"""A streamed image folder: the file list in memory, each image decoded when it is read.

``DIR/<class>/<image>`` folders of real-size photos do not fit in memory as tensors (ImageNet's
1.28 M images are ~190 GB at 224x224 in uint8); :class:`ImageFolderDataset` keeps only the paths
and labels and opens an image with Pillow in ``__getitem__``, in the DataLoader's worker
processes when there are some. :func:`estimate_mean_std` estimates the per-channel
normalisation from a fixed, seeded sample of training images (:data:`STATS_SAMPLE`, not the
whole folder), or :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` are used as given.

:func:`autoshrink.data.read_imagefolder` lists and splits the folder and builds these.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from autoshrink.task import TaskError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZE_CHOICES",
    "STATS_SAMPLE",
    "ImageFolderDataset",
    "estimate_mean_std",
    "load_image",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``normalize=`` values: estimated on the training images, or ImageNet's constants.
NORMALIZE_CHOICES = ("train", "imagenet")
#: Training images the mean/std are estimated on (seeded sample; all of them when fewer).
STATS_SAMPLE = 256

Transform = Callable[[torch.Tensor], torch.Tensor]


def load_image(path: str, mode: str, *, where: str = "imagefolder") -> torch.Tensor:
    """Decode one image as a float ``(C, H, W)`` tensor in [0, 1] (``mode`` ``"L"`` or ``"RGB"``).

    Raises:
        TaskError: the file cannot be read as an image, naming it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            arr = np.array(img.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise TaskError(f"{where}: cannot read {path}: {exc}") from exc
    t = torch.from_numpy(arr)
    t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    return t.float().div_(255.0)


class ImageFolderDataset(Dataset):
    """Images read from disk one at a time, transformed and standardised.

    Nothing is opened at construction: only the paths and labels are kept.

    Args:
        samples: ``(path, label)`` pairs.
        transform: ``(C, H, W)`` float image in [0, 1] → fixed-size ``(C, h, w)``
            (:class:`~autoshrink.tasks.transforms.TrainTransform` or ``EvalTransform``).
        mode: ``"L"`` (greyscale) or ``"RGB"``.
        mean, std: per-channel standardisation applied after ``transform``.
        num_workers: DataLoader worker processes for this dataset, read by
            :func:`autoshrink.device.loader_options` (None: :func:`autoshrink.device.default_workers` when
            training on CUDA, none on the CPU, where decoding would take the training cores).
        where: names the data source in errors (``"imagefolder:photos"``).

    Attributes:
        paths, targets: the file paths (strings) and labels, index-aligned.

    Example:
        >>> from autoshrink.tasks.transforms import EvalTransform
        >>> ds = ImageFolderDataset([("cat/1.png", 0)], EvalTransform(32), mean=(0.5,) * 3, std=(0.25,) * 3)
        >>> len(ds), ds.targets
        (1, [0])
    """

    def __init__(
        self,
        samples: Sequence[tuple[str | os.PathLike, int]],
        transform: Transform,
        *,
        mode: str = "RGB",
        mean: Sequence[float],
        std: Sequence[float],
        num_workers: int | None = None,
        where: str = "imagefolder",
    ) -> None:
        if mode not in ("L", "RGB"):
            raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
        chans = 1 if mode == "L" else 3
        if len(mean) != chans or len(std) != chans:
            raise ValueError(f"mean and std need {chans} value(s) for mode {mode!r}, got {list(mean)}, {list(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {list(std)}")
        self.paths = [os.fspath(p) for p, _ in samples]
        self.targets = [int(y) for _, y in samples]
        self.transform = transform
        self.mode = mode
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                        or num_workers < 0):
            raise ValueError(f"num_workers must be None or an integer >= 0, got {num_workers!r}")
        self.num_workers = num_workers
        self.where = where
        self._mean = torch.tensor(self.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.transform(load_image(self.paths[index], self.mode, where=self.where))
        return (image - self._mean) / self._std, torch.tensor(self.targets[index])

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({len(self)} images, {self.mode}, {self.transform!r}, "
                f"mean={self.mean}, std={self.std})")


def estimate_mean_std(
    paths: Sequence[str],
    mode: str,
    transform: Transform,
    *,
    sample: int = STATS_SAMPLE,
    seed: int = 0,
    where: str = "imagefolder",
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``transform``-ed images, over a seeded sample of ``paths``.

    The sample is the same for the same paths and seed; its size is bounded, so the cost does
    not grow with the folder. The std is floored at 1e-3 (a constant channel).

    Example:
        >>> mean, std = estimate_mean_std(paths, "RGB", EvalTransform(224))  # doctest: +SKIP
    """
    if not paths:
        raise TaskError(f"{where}: no training images to estimate the mean/std on")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(paths), size=min(sample, len(paths)), replace=False).tolist())
    total = sq = None
    count = 0
    for i in chosen:
        x = transform(load_image(paths[i], mode, where=where)).double()
        flat = x.flatten(1)
        s, q = flat.sum(1), (flat * flat).sum(1)
        total, sq = (s, q) if total is None else (total + s, sq + q)
        count += flat.shape[1]
    mean = total / count
    var = (sq / count - mean * mean).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())

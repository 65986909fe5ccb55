"""Readers for your own image data: ``imagefolder:DIR`` and ``cifar10:DIR``.

Both give an :class:`ImageData` (train and validation datasets, the class names, a hash and the
normalisation used), ready for :class:`autoshrink.Task`.

- ``imagefolder:DIR``: one sub-folder per class (``DIR/cat/*.png``, ``DIR/dog/*.jpg``),
  **streamed**: only the file list is read up front, and each image is decoded with Pillow when
  it is used (:class:`~autoshrink.tasks.imagefolder.ImageFolderDataset`), so a folder of any
  size fits. Greyscale or RGB by the model's input channels. A fixed, seeded, stratified split
  holds out ``val_fraction`` of each class for validation. Training images get the usual
  augmentation (random resized crop to the input size, horizontal flip: kornia); validation
  images are resized and centre-cropped (:mod:`autoshrink.tasks.transforms`). Pixels are scaled
  to [0, 1] and standardised per channel, with the mean/std estimated on a fixed sample of 256
  training images (``normalize="train"``) or ImageNet's (``normalize="imagenet"``); if your
  model was trained with other preprocessing, build the datasets yourself and pass them to
  :class:`autoshrink.Task`.
- ``cifar10:DIR``: the CIFAR-10 "python version" (``data_batch_1`` ... ``data_batch_5``,
  ``test_batch``, ``batches.meta``; DIR may also be the folder that contains
  ``cifar-10-batches-py``). Training data is the five training batches, validation the test
  batch, normalised with the usual CIFAR-10 channel mean and std.

Security: the CIFAR batches are Python pickles, and unpickling a file can run any code it names.
They are read with an unpickler that refuses every global except the few numpy needs to rebuild
an array, and only from files with the CIFAR batch names; anything else in them is an error.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from autoshrink.task import TaskError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGE_SUFFIXES",
    "ImageData",
    "ImageTensors",
    "load_data",
    "read_cifar10",
    "read_imagefolder",
]

SCHEMES = ("imagefolder", "cifar10")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN, "test_batch", "batches.meta")


class ImageTensors(TensorDataset):
    """Images kept as uint8 ``(N, C, H, W)`` (a quarter of the memory of float32), returned
    standardised as float32: ``((x / 255) - mean) / std`` per channel.

    It is a ``TensorDataset`` (``tensors == (images_uint8, labels)``), so the teacher's logits on
    it can be computed once and cached like the built-in tasks'.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        super().__init__(images, labels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __getitem__(self, index):
        x, y = self.tensors[0][index], self.tensors[1][index]
        return (x.float() / 255.0 - self.mean) / self.std, y

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # one vectorised conversion per batch instead of one per sample
        idx = torch.as_tensor(indices)
        x = (self.tensors[0][idx].float() / 255.0 - self.mean) / self.std
        return list(zip(x, self.tensors[1][idx], strict=True))


@dataclass
class ImageData:
    """Train/validation images of one data source.

    Attributes:
        train, val: the datasets (:class:`ImageTensors` in memory for CIFAR-10, streamed
            :class:`~autoshrink.tasks.imagefolder.ImageFolderDataset` for an image folder).
        classes: class names; label ``i`` is ``classes[i]``.
        digest: hash of the decoded pixels and labels (CIFAR-10: keys cached teachers to the
            data), or of the file list, sizes and settings (an image folder).
        description: one line for the run report.
        mean, std: the per-channel standardisation applied (for the run record).
        normalize: where ``mean``/``std`` came from: ``"train"`` (estimated on training
            images), ``"imagenet"``, ``"cifar10"``.
        input_size: ``(height, width)`` of the images the datasets return.
    """

    train: Dataset
    val: Dataset
    classes: list[str]
    digest: str
    description: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    normalize: str = ""
    input_size: tuple[int, int] = (32, 32)


def load_data(
    spec: str,
    *,
    in_chans: int = 3,
    size: tuple[int, int] = (32, 32),
    val_fraction: float = 0.2,
    seed: int = 0,
    normalize: str = "train",
    augment: bool = True,
    num_workers: int | None = None,
) -> ImageData:
    """Read ``imagefolder:DIR`` or ``cifar10:DIR``.

    Args:
        spec: ``scheme:DIR``.
        in_chans: 1 (greyscale) or 3 (RGB), the model's input channels.
        size: ``(height, width)`` images are cropped to (imagefolder only; CIFAR is 32x32).
        val_fraction, seed: the imagefolder validation split.
        normalize, augment, num_workers: imagefolder only, see :func:`read_imagefolder`.

    Raises:
        TaskError: unknown scheme, missing or empty folder, unreadable file.

    Example:
        >>> data = load_data("imagefolder:photos", in_chans=3, size=(32, 32))  # doctest: +SKIP
    """
    scheme, sep, path = spec.partition(":")
    if not sep or not path:
        raise TaskError(f"--data {spec!r}: expected SCHEME:DIR with SCHEME one of {list(SCHEMES)}, "
                        "e.g. imagefolder:photos/")
    if scheme not in SCHEMES:
        raise TaskError(f"--data {spec!r}: unknown data scheme {scheme!r}; use one of "
                        f"{', '.join(s + ':DIR' for s in SCHEMES)}")
    if scheme == "imagefolder":
        return read_imagefolder(path, in_chans=in_chans, size=size, val_fraction=val_fraction,
                                seed=seed, normalize=normalize, augment=augment, num_workers=num_workers)
    if size != (32, 32):
        raise TaskError(f"--data {spec!r}: CIFAR-10 images are 32x32 but the model expects "
                        f"{size[0]}x{size[1]}")
    return read_cifar10(path, in_chans=in_chans)


# -- imagefolder ------------------------------------------------------------------------------------
def read_imagefolder(
    root: str | Path,
    *,
    in_chans: int = 3,
    size: tuple[int, int] = (32, 32),
    val_fraction: float = 0.2,
    seed: int = 0,
    normalize: str = "train",
    augment: bool = True,
    num_workers: int | None = None,
    crop_fraction: float = 0.875,
) -> ImageData:
    """Class sub-folders of images, streamed from disk and split (see the module docstring).

    Only the file list is read here, plus the (at most) 256 training images the mean/std are
    estimated on when ``normalize="train"``; every other image is opened when it is read.

    Args:
        root: the folder of class sub-folders.
        in_chans: 1 (greyscale) or 3 (RGB).
        size: ``(height, width)`` the datasets return (``--input-size``; the model's input).
        val_fraction, seed: the stratified validation split (the seed also picks the
            normalisation sample).
        normalize: ``"train"`` (per-channel mean/std of a fixed sample of training images,
            after the validation transform) or ``"imagenet"`` (ImageNet's constants; greyscale:
            their average).
        augment: random resized crop + flip for training images (False: the validation
            transform for both, e.g. for data where a flip changes the class).
        num_workers: DataLoader worker processes decoding images (None: automatic, see
            :func:`autoshrink.device.loader_options`; 0: decode in the training process).
        crop_fraction: the validation centre crop's share of the resized image (0.875: 224 of 256).

    Raises:
        TaskError: missing or empty folder, a single class, too few images to split, an
            unreadable image among the normalisation sample (others: when read), a bad
            ``normalize``.

    Example:
        >>> data = read_imagefolder("photos", in_chans=1, size=(28, 28))  # doctest: +SKIP
        >>> data.classes                                                   # doctest: +SKIP
        ['cat', 'dog']
    """
    from autoshrink.tasks.imagefolder import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        NORMALIZE_CHOICES,
        ImageFolderDataset,
        estimate_mean_std,
    )
    from autoshrink.tasks.transforms import EvalTransform, TrainTransform, input_hw

    root = Path(root)
    where = f"imagefolder:{root}"
    mode = _pil_mode(in_chans)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if normalize not in NORMALIZE_CHOICES:
        raise TaskError(f"--normalize {normalize!r}: expected one of {list(NORMALIZE_CHOICES)} (train: "
                        "mean/std estimated on the training images; imagenet: ImageNet's constants)")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 0):
        raise ValueError(f"num_workers must be None or an integer >= 0, got {num_workers!r}")
    height, width = input_hw(size)
    if not root.is_dir():
        raise TaskError(f"imagefolder:{root}: no such folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise TaskError(f"imagefolder:{root}: no class sub-folders (expected {root}/<class>/<image>)")
    files: list[list[Path]] = []
    for name in classes:
        found = sorted(p for p in (root / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise TaskError(f"imagefolder:{root}: class folder {name!r} has no images "
                            f"({', '.join(IMAGE_SUFFIXES)})")
        files.append(found)
    if len(classes) < 2:
        raise TaskError(f"imagefolder:{root}: only one class folder ({classes[0]!r}); a "
                        "classifier needs at least two")
    # absolute: Ray and DataLoader workers may run in another folder
    paths = [os.path.abspath(p) for found in files for p in found]
    y = torch.tensor([label for label, found in enumerate(files) for _ in found], dtype=torch.long)
    train_idx, val_idx = _stratified_split(y, val_fraction, seed)
    if len(val_idx) == 0:
        raise TaskError(f"{where}: too few images to hold any out for validation "
                        f"({len(y)} images, val_fraction={val_fraction})")
    train_samples = [(paths[i], int(y[i])) for i in train_idx.tolist()]
    val_samples = [(paths[i], int(y[i])) for i in val_idx.tolist()]
    eval_tf = EvalTransform((height, width), crop_fraction=crop_fraction)
    if normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if in_chans == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    else:
        mean, std = estimate_mean_std([p for p, _ in train_samples], mode, eval_tf, seed=seed, where=where)
    train_tf = TrainTransform((height, width)) if augment else eval_tf
    digest = _files_digest(root, paths, y, extra=f"imagefolder-{classes}-{val_fraction}-{seed}-{mode}-"
                                                 f"{height}x{width}-{normalize}-{augment}-{crop_fraction}")
    norm = ("the mean/std of a sample of training images" if normalize == "train" else "ImageNet's mean/std")
    norm += f" (mean {[round(v, 4) for v in mean]}, std {[round(v, 4) for v in std]})"
    aug = "random resized crop + flip for training, " if augment else ""
    return ImageData(
        train=ImageFolderDataset(train_samples, train_tf, mode=mode, mean=mean, std=std,
                                 num_workers=num_workers, where=where),
        val=ImageFolderDataset(val_samples, eval_tf, mode=mode, mean=mean, std=std,
                               num_workers=num_workers, where=where),
        classes=classes,
        digest=digest,
        description=(f"imagefolder {root}: {len(classes)} classes, {len(train_samples)} training and "
                     f"{len(val_samples)} validation images ({val_fraction:.0%} of each class, seed "
                     f"{seed}), streamed from disk, {mode} {height}x{width} ({aug}resize + centre crop "
                     f"{crop_fraction:g} for validation), standardised with {norm}"),
        mean=tuple(mean),
        std=tuple(std),
        normalize=normalize,
        input_size=(height, width),
    )


def _pil_mode(in_chans: int) -> str:
    if in_chans == 1:
        return "L"
    if in_chans == 3:
        return "RGB"
    raise TaskError(f"the model takes {in_chans} input channels; image data can feed 1 (greyscale) "
                    "or 3 (RGB)")


def _stratified_split(labels: torch.Tensor, val_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(int(labels.max()) + 1):
        idx = np.flatnonzero(labels.numpy() == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        n_val = min(max(n_val, 1 if len(idx) > 1 else 0), len(idx) - 1)
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return torch.tensor(sorted(train), dtype=torch.long), torch.tensor(sorted(val), dtype=torch.long)


def _files_digest(root: Path, paths: list[str], y: torch.Tensor, extra: str = "") -> str:
    """Hash of the file list (paths relative to ``root`` and byte sizes), labels and settings:
    what identifies a streamed folder without decoding it."""
    h = hashlib.sha1(extra.encode())
    for p in paths:
        h.update(f"{Path(p).relative_to(root.absolute()).as_posix()}\0{os.path.getsize(p)}\0".encode())
    h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


def _digest(x: torch.Tensor, y: torch.Tensor, extra: str = "") -> str:
    h = hashlib.sha1(extra.encode())
    h.update(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


# -- CIFAR-10 ---------------------------------------------------------------------------------------
def read_cifar10(root: str | Path, *, in_chans: int = 3) -> ImageData:
    """The CIFAR-10 python batches (see the module docstring); ``in_chans=1`` converts to
    greyscale (ITU-R 601 luma).

    Example:
        >>> data = read_cifar10("cifar-10-batches-py")  # doctest: +SKIP
        >>> len(data.train), len(data.val)              # doctest: +SKIP
        (50000, 10000)
    """
    root = Path(root)
    if not root.is_dir():
        raise TaskError(f"cifar10:{root}: no such folder")
    if not (root / "batches.meta").is_file() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    missing = [f for f in _CIFAR_FILES if not (root / f).is_file()]
    if missing:
        raise TaskError(f"cifar10:{root}: not the CIFAR-10 python layout, missing {missing} "
                        "(expected data_batch_1..5, test_batch, batches.meta)")
    meta = _load_cifar_pickle(root / "batches.meta")
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise TaskError(f"cifar10:{root / 'batches.meta'}: no b'label_names' list of class names")
    classes = [n.decode() if isinstance(n, bytes) else n for n in names]
    xs, ys = [], []
    for name in (*_CIFAR_TRAIN, "test_batch"):
        x, y = _cifar_batch(root / name, len(classes))
        xs.append(x)
        ys.append(y)
    train_x, train_y = torch.cat(xs[:-1]), torch.cat(ys[:-1])
    val_x, val_y = xs[-1], ys[-1]
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    if in_chans == 1:
        train_x, val_x = _luma(train_x), _luma(val_x)
        grey = train_x.float() / 255.0
        mean, std = (grey.mean().item(),), (grey.std().clamp_min(1e-3).item(),)
    elif in_chans != 3:
        _pil_mode(in_chans)  # raises with the message
    digest = _digest(torch.cat([train_x, val_x]), torch.cat([train_y, val_y]), extra="cifar10")
    return ImageData(
        train=ImageTensors(train_x, train_y, mean, std),
        val=ImageTensors(val_x, val_y, mean, std),
        classes=classes,
        digest=digest,
        description=(f"CIFAR-10 {root}: {len(train_y)} training images (data_batch_1..5), "
                     f"{len(val_y)} validation images (test_batch), "
                     f"{'RGB' if in_chans == 3 else 'greyscale'} 32x32, "
                     f"{'CIFAR-10' if in_chans == 3 else 'training'} mean/std"),
        mean=tuple(mean),
        std=tuple(std),
        normalize="cifar10" if in_chans == 3 else "train",
        input_size=(32, 32),
    )


_LUMA = (0.299, 0.587, 0.114)


def _luma(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA).view(1, 3, 1, 1)
    return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def _cifar_batch(path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _load_cifar_pickle(path)
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        raise TaskError(f"cifar10:{path}: b'data' is not a uint8 (N, 3072) array")
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        raise TaskError(f"cifar10:{path}: b'labels' is not a list of {len(data)} labels")
    y = torch.tensor(np.asarray(labels, dtype=np.int64))
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise TaskError(f"cifar10:{path}: labels outside 0..{num_classes - 1}")
    x = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return x, y


# The only globals a CIFAR batch (a dict of bytes, lists and one numpy array) needs.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Refuses every global outside :data:`_SAFE_GLOBALS`, so a crafted file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") or module.startswith("numpy._core."):
            import importlib

            sub = module.split(".", 2)[2]
            for base in ("numpy._core", "numpy.core"):  # numpy 2 renamed numpy.core
                try:
                    return getattr(importlib.import_module(f"{base}.{sub}"), name)
                except (ImportError, AttributeError):
                    continue
        return super().find_class(module, name)


def _load_cifar_pickle(path: Path):
    try:
        raw = path.read_bytes()
        return _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise TaskError(f"cifar10:{path}: not a CIFAR-10 batch ({exc})") from exc
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise TaskError(f"cifar10:{path}: unreadable ({type(exc).__name__}: {exc})") from exc

"""The built-in ``digits`` task: real handwritten digits, no download.

Data (all fixed and seeded, so every run and every machine sees the same samples):

1. scikit-learn's bundled UCI handwritten digits: 1,797 greyscale 8x8 images of 10 classes
   (shipped inside the scikit-learn wheel).
2. A stratified split with ``random_state=0``: 1,347 training digits, 450 held-out digits.
   Validation samples are made only from the held-out digits, so no validation image shares a
   source digit with training.
3. Each 8x8 digit is scaled to [0, 1], upscaled bilinearly to 24x24 and zero-padded to 32x32.
4. Distortions, the same recipe for training and validation but different seeds: a random affine
   map (rotation ±25°, scale 0.8-1.15, shear ±0.2, shift ±4 px) then Gaussian blur-free pixel
   noise (σ = 0.25) and a random occluding 10x10 square on half of the samples. Clean digits
   saturate (a ResNet gets 99.7 % of 450, 0.28 pt per image); the distortions keep the teacher
   off the ceiling and give ``VAL_COPIES`` x 450 = 4,500 validation samples, so accuracy
   resolves ~0.5 pt (standard error at 95 % is 0.32 pt; copies of one source digit are
   correlated, so treat that as a lower bound).
5. Training set: ``TRAIN_COPIES`` distorted copies of each training digit (fixed: teacher logits
   for KD can then be computed once and cached).

The teacher (``resnet18_32`` by default, any zoo model by name) is trained on first use and
cached under the user cache folder (``AUTOSHRINK_CACHE`` overrides); it is loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from autoshrink._env import cache_dir
from autoshrink._files import atomic_path
from autoshrink.task import Task, TaskError

__all__ = ["DigitsData", "digits_data", "digits_task", "train_teacher"]

TRAIN_COPIES = 4
VAL_COPIES = 10
MEAN, STD = 0.1, 0.3
DATA_VERSION = 1  # bump when the recipe above changes: cached teachers are keyed by it


class DigitsData:
    """Train/val tensors of the digits task (see module docstring for the recipe)."""

    def __init__(self, train: TensorDataset, val: TensorDataset) -> None:
        self.train = train
        self.val = val


def _distort(images: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = images.repeat(copies, 1, 1, 1)
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    angle = u(-25, 25) * math.pi / 180
    scale = u(0.8, 1.15)
    shear = u(-0.2, 0.2)
    tx, ty = u(-4, 4) / 16, u(-4, 4) / 16  # affine_grid works in [-1, 1]: 16 px per unit
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    x = x + 0.25 * torch.randn(x.shape, generator=gen)
    occlude = torch.rand(n, generator=gen) < 0.5
    ox = torch.randint(0, 23, (n,), generator=gen)
    oy = torch.randint(0, 23, (n,), generator=gen)
    for i in torch.nonzero(occlude).flatten().tolist():
        x[i, :, oy[i] : oy[i] + 10, ox[i] : ox[i] + 10] = 0.0
    return ((x.clamp(0, 1) - MEAN) / STD).contiguous()


def digits_data() -> DigitsData:
    """Build the train/val datasets (about a second; deterministic)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_val = train_test_split(
        np.arange(len(labels)), test_size=450, stratify=digits.target, random_state=0
    )
    big = F.interpolate(images, size=(24, 24), mode="bilinear", align_corners=False)
    big = F.pad(big, (4, 4, 4, 4))
    tr, va = torch.as_tensor(idx_train), torch.as_tensor(idx_val)
    x_train = _distort(big[tr], TRAIN_COPIES, seed=1)
    x_val = _distort(big[va], VAL_COPIES, seed=2)
    y_train = labels[tr].repeat(TRAIN_COPIES)
    y_val = labels[va].repeat(VAL_COPIES)
    return DigitsData(TensorDataset(x_train, y_train), TensorDataset(x_val, y_val))


def train_teacher(
    model: nn.Module,
    data: DigitsData,
    *,
    epochs: int = 6,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    label: str = "training the digits teacher (first use only; cached)",
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Train ``model`` from scratch on ``data.train`` (SGD + one-cycle schedule); ``label``
    names the progress bar.

    ``device`` trains there (bf16 autocast on CUDA, see :mod:`autoshrink.device`); the model is
    moved back to where it was when training ends."""
    from autoshrink.device import autocast, loader_options, model_device, resolve_device

    dev = resolve_device(device)
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
        **loader_options(data.train, dev),
    )
    steps = epochs * len(loader)
    home = model_device(model)
    model.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    model.train()
    bar = _progress(progress, steps, label)
    try:
        for _ in range(epochs):
            for x, y in loader:
                if dev.type != "cpu":
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                with autocast(dev):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.advance(loss.item())
    finally:
        bar.close()
        model.to(home)
    return model.eval()


class _Bar:
    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps · loss {task.fields[loss]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(label, total=total, loss="-")

    def advance(self, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=f"{loss:.3f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _progress(enabled: bool, total: int, label: str) -> _Bar:
    return _Bar(enabled, total, label)


def _teacher_path(model_name: str, epochs: int) -> Path:
    key = hashlib.sha1(f"{model_name}-v{DATA_VERSION}-e{epochs}-{torch.__version__}".encode()).hexdigest()[:10]
    return cache_dir() / "teachers" / f"digits-{model_name}-{key}.pt"


def digits_task(model: str = "resnet18_32", *, epochs: int | None = None, progress: bool = True,
                device: str = "cpu") -> Task:
    """The digits task with a zoo model as teacher, trained on first use and then cached.

    Args:
        model: a name from :func:`autoshrink.models.list_models`.
        epochs: teacher training epochs (default 6; ``AUTOSHRINK_TEACHER_EPOCHS`` overrides).
        progress: show a progress bar while training the teacher.
        device: where a teacher not yet cached is trained and first evaluated (the task's
            model is on the CPU either way).

    Example:
        >>> task = digits_task()            # doctest: +SKIP
        >>> task.teacher_accuracy           # doctest: +SKIP
    """
    from autoshrink import models

    epochs = epochs or int(os.environ.get("AUTOSHRINK_TEACHER_EPOCHS", "6"))
    data = digits_data()
    teacher = models.create(model, num_classes=10, in_chans=1)
    path = _teacher_path(model, epochs)
    meta_acc = None
    if path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            teacher.load_state_dict(state["model"])
            meta_acc = float(state["accuracy"])
        except Exception as exc:  # never trust a damaged or tampered cache file
            raise TaskError(
                f"the cached teacher {path} cannot be loaded safely ({type(exc).__name__}); "
                "delete it and it will be trained again"
            ) from None
    else:
        start = time.perf_counter()
        train_teacher(teacher, data, epochs=epochs, progress=progress, device=device)
        task = Task(teacher, data.train, data.val, data.val[0][0].unsqueeze(0))
        meta_acc, _ = task.evaluate(teacher, device=device)
        with atomic_path(path) as tmp:
            torch.save({"model": teacher.state_dict(), "accuracy": meta_acc,
                        "train_s": time.perf_counter() - start}, tmp)
    teacher.eval()
    return Task(
        model=teacher,
        train_data=data.train,
        val_data=data.val,
        example_input=data.val[0][0].unsqueeze(0),
        name="digits" if model == "resnet18_32" else f"digits-{model}",
        teacher_accuracy=meta_acc,
        description=(
            f"UCI digits (scikit-learn), 32x32, {len(data.train)} distorted training and "
            f"{len(data.val)} distorted validation samples from 450 held-out digits; teacher {model}"
        ),
    )

"""The built-in ``digits`` task: real handwritten digits, no download.

Data (all fixed and seeded, so every run and every machine sees the same samples):

1. scikit-learn's bundled UCI handwritten digits: 1,797 greyscale 8x8 images of 10 classes
   (shipped inside the scikit-learn wheel).
2. A stratified split with ``random_state=0``: 1,347 training digits, 450 held-out digits; the
   held-out digits are split again, stratified and seeded, into 225 validation and 225 test
   digits *before* any distorted copy is made. Validation and test samples are made only from
   their own digits, so no image of one split shares a source digit with another split
   (``DigitsData.*_digits`` give each sample's source digit).
3. Each 8x8 digit is scaled to [0, 1], upscaled bilinearly to 24x24 and zero-padded to 32x32.
4. Distortions, the same recipe for training and validation but different seeds: a random affine
   map (rotation ±25°, scale 0.8-1.15, shear ±0.2, shift ±4 px) then Gaussian blur-free pixel
   noise (σ = 0.25) and a random occluding 10x10 square on half of the samples. Clean digits
   saturate (a ResNet gets 99.7 % of 450, 0.28 pt per image); the distortions keep the teacher
   off the ceiling and give ``VAL_COPIES`` x 225 = 2,250 validation and ``TEST_COPIES`` x 225 =
   2,250 test samples; at ~95 % a split's binomial standard error is ~0.46 pt (copies of one
   source digit are correlated, so treat that as a lower bound). Early stopping and the choice
   of the best trial use validation; test is scored once, for the front and the chosen model.
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
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from autoshrink._env import cache_dir
from autoshrink._progress import Bar
from autoshrink.task import Task
from autoshrink.tasks._teacher_cache import cached_teacher

__all__ = ["DigitsData", "digits_data", "digits_task", "train_teacher"]

TRAIN_COPIES = 4
VAL_COPIES = 10
TEST_COPIES = 10
HELD_OUT_DIGITS = 450
TEST_DIGITS = 225  # of the held-out digits
MEAN, STD = 0.1, 0.3
# bump when the training data's recipe changes: cached teachers are keyed by it (the teacher
# trains on the training split alone, so the val/test split below does not change it)
DATA_VERSION = 1
# bump when the held-out split changes: a cached teacher's stored validation accuracy is then
# recomputed on the new validation split (its weights stay valid)
SPLIT_VERSION = 2


class DigitsData:
    """Train/val/test tensors of the digits task (see module docstring for the recipe).

    ``train_digits``/``val_digits``/``test_digits`` hold, per sample, the index of its source
    digit in scikit-learn's ``load_digits()`` (copies of one digit share it).
    """

    def __init__(
        self,
        train: TensorDataset,
        val: TensorDataset,
        test: TensorDataset | None = None,
        *,
        train_digits: torch.Tensor | None = None,
        val_digits: torch.Tensor | None = None,
        test_digits: torch.Tensor | None = None,
    ) -> None:
        self.train = train
        self.val = val
        self.test = test
        self.train_digits = train_digits
        self.val_digits = val_digits
        self.test_digits = test_digits


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
    """Build the train/val/test datasets (about a second; deterministic)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_held = train_test_split(
        np.arange(len(labels)), test_size=HELD_OUT_DIGITS, stratify=digits.target, random_state=0
    )
    # split the original digits, not their copies: no digit may be in both validation and test
    idx_val, idx_test = train_test_split(
        idx_held, test_size=TEST_DIGITS, stratify=digits.target[idx_held], random_state=0
    )
    big = F.interpolate(images, size=(24, 24), mode="bilinear", align_corners=False)
    big = F.pad(big, (4, 4, 4, 4))
    tr, va, te = (torch.as_tensor(i) for i in (idx_train, idx_val, idx_test))
    x_train = _distort(big[tr], TRAIN_COPIES, seed=1)
    x_val = _distort(big[va], VAL_COPIES, seed=2)
    x_test = _distort(big[te], TEST_COPIES, seed=3)
    # _distort stacks whole copies of the batch one after another: sample i is digit i % n
    return DigitsData(
        TensorDataset(x_train, labels[tr].repeat(TRAIN_COPIES)),
        TensorDataset(x_val, labels[va].repeat(VAL_COPIES)),
        TensorDataset(x_test, labels[te].repeat(TEST_COPIES)),
        train_digits=tr.repeat(TRAIN_COPIES),
        val_digits=va.repeat(VAL_COPIES),
        test_digits=te.repeat(TEST_COPIES),
    )


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
    bar = Bar(label, steps, unit="steps", extra="· loss {task.fields[loss]}", fields={"loss": "-"}, enabled=progress)
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
                bar.advance(loss=f"{loss.item():.3f}")
    finally:
        bar.close()
        model.to(home)
    return model.eval()


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
    example = data.val[0][0].unsqueeze(0)

    def score(teacher: nn.Module) -> float:
        return Task(teacher, data.train, data.val, example).evaluate(teacher, device=device)[0]

    def train(teacher: nn.Module) -> float:
        train_teacher(teacher, data, epochs=epochs, progress=progress, device=device)
        return score(teacher)

    teacher, meta_acc = cached_teacher(
        _teacher_path(model, epochs), lambda: models.create(model, num_classes=10, in_chans=1), train,
        # weights depend on the training split only; an accuracy taken on an older validation
        # split is taken again on this one
        tag=f"split-{SPLIT_VERSION}", rescore=score,
    )
    return Task(
        model=teacher,
        train_data=data.train,
        val_data=data.val,
        example_input=example,
        name="digits" if model == "resnet18_32" else f"digits-{model}",
        teacher_accuracy=meta_acc,
        description=(
            f"UCI digits (scikit-learn), 32x32, {len(data.train)} distorted training samples; "
            f"{len(data.val)} validation and {len(data.test or ())} test samples from "
            f"{HELD_OUT_DIGITS - TEST_DIGITS} and {TEST_DIGITS} disjoint held-out digits; teacher {model}"
        ),
        test_data=data.test,
    )

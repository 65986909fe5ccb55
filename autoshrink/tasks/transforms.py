"""Image transforms for streamed image folders: the usual train augmentation and eval crop.

- :class:`TrainTransform`: random resized crop (area 8-100 %, aspect 3/4-4/3) to the input
  size, then a horizontal flip with probability 0.5 — kornia's ``RandomResizedCrop`` and
  ``RandomHorizontalFlip`` (torchvision does not load beside this torch build; kornia is a
  maintained pure-torch library that does). Its random draws come from torch's generator, which
  a ``DataLoader`` seeds in each worker from its own ``generator`` (``base_seed + worker_id``),
  so a seeded loader gives the same crops every run.
- :class:`EvalTransform`: resize (bilinear, antialiased) so the image just covers
  ``size / crop_fraction`` keeping its aspect, then the centre ``size`` crop (the standard
  ImageNet evaluation at ``crop_fraction=0.875``: 256 → 224). The resize is torch's own
  ``interpolate(antialias=True)``: kornia's antialiased resize blurs first and was ~10x slower
  on one CPU thread; the crop is a slice (exact, no resampling).

Both take one ``(C, H, W)`` float image in [0, 1] and return ``(C, h, w)``; normalisation is the
dataset's job. The kornia modules are built on first use and not pickled, so a dataset holding
a transform travels to Ray and DataLoader workers as plain data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["EvalTransform", "TrainTransform", "eval_resize_shape", "input_hw"]


def input_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from ``224``, ``(224, 224)`` or ``(3, 224, 224)``.

    Raises:
        ValueError: anything else, or a side below 1.

    Example:
        >>> input_hw(224), input_hw((3, 160, 128))
        ((224, 224), (160, 128))
    """
    if isinstance(size, bool):
        raise ValueError(f"--input-size must be an integer or (height, width), got {size!r}")
    if isinstance(size, int):
        hw = (size, size)
    elif isinstance(size, Sequence) and len(size) in (2, 3) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in size
    ):
        hw = (int(size[-2]), int(size[-1]))
    else:
        raise ValueError(f"--input-size must be an integer or (height, width), got {size!r}")
    if min(hw) < 1:
        raise ValueError(f"--input-size sides must be >= 1, got {size!r}")
    return hw


class TrainTransform:
    """Random resized crop to ``size`` and a random horizontal flip (kornia).

    Args:
        size: output ``(height, width)`` (or one int for a square).
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height).
        flip: probability of a horizontal flip.

    Example:
        >>> t = TrainTransform(8)
        >>> _ = torch.manual_seed(0); a = t(torch.rand(3, 20, 30))
        >>> a.shape
        torch.Size([3, 8, 8])
    """

    def __init__(
        self,
        size: int | Sequence[int],
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: float = 0.5,
    ) -> None:
        self.size = input_hw(size)
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip is a probability in [0, 1], got {flip}")
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), float(flip)
        self._aug = None

    def _build(self):
        import kornia.augmentation as K

        return K.AugmentationSequential(
            K.RandomResizedCrop(self.size, scale=self.scale, ratio=self.ratio),
            K.RandomHorizontalFlip(p=self.flip),
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self._aug is None:
            self._aug = self._build()
        with torch.no_grad():
            return self._aug(image.unsqueeze(0)).squeeze(0)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_aug": None}

    def __repr__(self) -> str:
        return f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip})"


def eval_resize_shape(height: int, width: int, size: tuple[int, int], crop_fraction: float) -> tuple[int, int]:
    """The ``(height, width)`` an image is resized to before the centre crop: the smallest
    aspect-keeping size that covers ``size / crop_fraction``.

    Example:
        >>> eval_resize_shape(375, 500, (224, 224), 0.875)
        (256, 341)
    """
    h, w = size
    scale = max(h / crop_fraction / height, w / crop_fraction / width)
    return max(h, round(height * scale)), max(w, round(width * scale))


class EvalTransform:
    """Resize (keeping the aspect ratio) then centre-crop to ``size``.

    Args:
        size: output ``(height, width)`` (or one int for a square).
        crop_fraction: the crop's share of the resized image's shorter side (0.875: 224 of 256).

    Example:
        >>> EvalTransform(224)(torch.rand(3, 375, 500)).shape
        torch.Size([3, 224, 224])
    """

    def __init__(self, size: int | Sequence[int], *, crop_fraction: float = 0.875) -> None:
        self.size = input_hw(size)
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.crop_fraction = float(crop_fraction)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        rh, rw = eval_resize_shape(height, width, self.size, self.crop_fraction)
        if (rh, rw) != (height, width):
            with torch.no_grad():
                image = F.interpolate(image.unsqueeze(0), size=(rh, rw), mode="bilinear",
                                      align_corners=False, antialias=True).squeeze(0)
        h, w = self.size
        top, left = (rh - h) // 2, (rw - w) // 2
        return image[:, top:top + h, left:left + w].contiguous()

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, crop_fraction={self.crop_fraction})"

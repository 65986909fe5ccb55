"""Train augmentation (random resized crop + flip, kornia) and the eval resize + centre crop."""

from __future__ import annotations

import pickle

import pytest
import torch

from autoshrink.tasks.transforms import EvalTransform, TrainTransform, eval_resize_shape, input_hw


def _image(h: int = 60, w: int = 80) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, h, w, generator=g)


def test_input_size_forms_and_errors():
    assert input_hw(224) == (224, 224)
    assert input_hw((160, 128)) == (160, 128)
    assert input_hw([3, 32, 48]) == (32, 48)
    for bad in (0, (0, 4), "224", True, (1, 2, 3, 4), 2.5):
        with pytest.raises(ValueError, match="--input-size"):
            input_hw(bad)


def test_train_transform_shape_range_and_seeded_determinism():
    t = TrainTransform(224)
    img = _image()
    torch.manual_seed(5)
    a = t(img)
    torch.manual_seed(5)
    b = t(img)
    assert a.shape == (3, 224, 224) and a.dtype == torch.float32
    assert torch.equal(a, b)  # same seed, same crop and flip
    assert float(a.min()) >= -1e-5 and float(a.max()) <= 1 + 1e-5
    torch.manual_seed(6)
    assert not any(torch.equal(a, t(img)) for _ in range(3))  # another seed, other crops
    assert TrainTransform((32, 48))(img).shape == (3, 32, 48)
    assert TrainTransform(16)(torch.rand(1, 20, 20)).shape == (1, 16, 16)  # greyscale


def test_flip_is_a_mirror_of_the_same_crop():
    img = _image()
    keep, mirror = TrainTransform(24, flip=0.0), TrainTransform(24, flip=1.0)
    torch.manual_seed(1)
    a = keep(img)
    torch.manual_seed(1)
    b = mirror(img)
    assert torch.allclose(b, a.flip(-1), atol=1e-6)


def test_full_crop_is_a_plain_resize():
    img = _image(40, 40)
    t = TrainTransform(40, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0)
    assert torch.allclose(t(img), img, atol=1e-5)


def test_train_transform_errors_and_pickling():
    with pytest.raises(ValueError, match="scale"):
        TrainTransform(8, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="ratio"):
        TrainTransform(8, ratio=(0.0, 1.0))
    with pytest.raises(ValueError, match="flip"):
        TrainTransform(8, flip=2.0)
    t = TrainTransform(8)
    t(_image())  # builds the kornia modules
    copy = pickle.loads(pickle.dumps(t))  # they are not pickled: rebuilt on first use
    torch.manual_seed(0)
    a = t(_image())
    torch.manual_seed(0)
    assert torch.equal(copy(_image()), a)


def test_eval_transform_resizes_then_centre_crops():
    assert eval_resize_shape(375, 500, (224, 224), 0.875) == (256, 341)
    assert eval_resize_shape(500, 375, (224, 224), 0.875) == (341, 256)
    assert eval_resize_shape(10, 10, (8, 8), 1.0) == (8, 8)
    # an image already at the resize size: the output is exactly its centre
    img = _image(256, 320)
    out = EvalTransform(224)(img)
    assert out.shape == (3, 224, 224)
    assert torch.equal(out, img[:, 16:240, 48:272])
    # a larger one is resized first (aspect kept), then cropped; always the same
    big = _image(375, 500)
    a, b = EvalTransform(224)(big), EvalTransform(224)(big)
    assert a.shape == (3, 224, 224) and torch.equal(a, b)
    assert EvalTransform((32, 48), crop_fraction=1.0)(big).shape == (3, 32, 48)
    with pytest.raises(ValueError, match="crop_fraction"):
        EvalTransform(8, crop_fraction=0.0)

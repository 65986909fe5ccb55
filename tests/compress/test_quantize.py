"""Per-layer quantization: 4-bit weight range, fp32 layers, lowering agrees with fake-quant."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autoshrink import Candidate
from autoshrink.compress import compress
from autoshrink.compress.quantize import (
    compile_cpu,
    export_model,
    fold_bn_,
    lower,
    prepare_ptq,
    set_eval,
    set_train,
)


def _qat_steps(model, task, steps=8):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    set_train(model)
    x, y = task.train_data.tensors
    for i in range(steps):
        xb, yb = x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    set_eval(model)


def test_lowered_int8_agrees_with_fake_quant(tiny_task):
    cand = Candidate(bits={"layer1.*": 4, "fc": 32}, default_bits=8, prune={"layer2.*": 0.25})
    comp = compress(tiny_task.model, cand, tiny_task.example_input)
    student = comp.trainable(tiny_task.example_input)
    _qat_steps(student, tiny_task)
    x = tiny_task.val_data.tensors[0][:256]
    with torch.no_grad():
        fq = student(x).argmax(1)
        lowered = lower(student)
        ref = lowered(x).argmax(1)
        fast = compile_cpu(lowered)(x).argmax(1)
    assert (fq == ref).float().mean() >= 0.97
    assert (fq == fast).float().mean() >= 0.97


def test_int8_accuracy_is_the_fake_quant_accuracy(tiny_task):
    # honesty: a trial reports the accuracy of the lowered, compiled int8 model; it must be what
    # the fine-tune (fake-quant) reached, or the search ranks models by numbers nobody deploys
    from autoshrink.compress.distill import finetune

    cand = Candidate(bits={"layer1.*": 4, "fc": 32}, default_bits=8, prune={"layer2.*": 0.25},
                     finetune_steps=40, batch_size=32, round_to=8)
    comp = compress(tiny_task.model, cand, tiny_task.example_input)
    student = comp.trainable(tiny_task.example_input, list(tiny_task.calibration_batches()))
    finetune(student, tiny_task, cand)
    fake, _ = tiny_task.evaluate(student)
    deployed, _ = tiny_task.evaluate(compile_cpu(lower(student)), fixed_batch=True)
    teacher, _ = tiny_task.evaluate(tiny_task.model)
    assert fake > teacher - 15  # a real model, not noise
    assert abs(fake - deployed) <= 0.5, (fake, deployed)


def test_four_bit_weights_stay_in_range(tiny_task):
    cand = Candidate(bits={"layer1.*": 4}, default_bits=32)
    comp = compress(tiny_task.model, cand, tiny_task.example_input)
    calib = [tiny_task.train_data.tensors[0][:32]]
    lowered = lower(prepare_ptq(comp.pruned, cand, tiny_task.example_input, calib))
    int_weights = [t for t in lowered.state_dict().values() if t.dtype == torch.int8]
    ranges = sorted((int(t.min()), int(t.max())) for t in int_weights)
    assert ranges, "no int8 weights: nothing was quantized"
    assert all(-8 <= lo and hi <= 7 for lo, hi in ranges)


def test_all_fp32_is_not_quantized(tiny_task):
    comp = compress(tiny_task.model, Candidate.uniform(bits=32), tiny_task.example_input)
    assert comp.trainable(tiny_task.example_input).__class__ is tiny_task.model.__class__


class _SharedRelu(nn.Module):
    """torchvision-style: one ReLU module called twice (used to break PT2E QAT)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(y.mean((2, 3)))


def test_reused_activation_module_quantizes():
    m, x = _SharedRelu(), torch.randn(1, 1, 8, 8)
    comp = compress(m, Candidate.uniform(bits=8), x)
    student = comp.trainable(x)
    assert isinstance(student, torch.fx.GraphModule)
    set_eval(student)
    assert student(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_fp32_conv_next_to_int8_conv_trains(tiny_task):
    # fp32 convs with BatchNorm used to crash PT2E's QAT conv-BN fusion
    cand = Candidate(bits={"layer2.*": 32}, default_bits=8)
    comp = compress(tiny_task.model, cand, tiny_task.example_input)
    student = comp.trainable(tiny_task.example_input)
    _qat_steps(student, tiny_task, steps=2)


def test_fold_bn_is_exact():
    m = _SharedRelu().eval()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-1, 1)
        m.bn1.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = m(x)
    folded = fold_bn_(m, {"conv1"}, x[:1])
    with torch.no_grad():
        after = m(x)
    assert folded == ["conv1"] and isinstance(m.bn1, nn.Identity)
    assert torch.allclose(before, after, atol=1e-5)


def test_export_has_dynamic_batch():
    m = copy.deepcopy(_SharedRelu()).eval()
    gm = export_model(m, torch.randn(1, 1, 8, 8))
    assert gm(torch.randn(5, 1, 8, 8)).shape == (5, 3)


def test_fp32_conv_feeding_an_int8_conv_bn_prepares():
    # torchao's QAT conv-BN fusion used to crash (IndexError) re-keying the fp32 input conv
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8),
                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(1, 1, 8, 8)
    comp = compress(m, Candidate(bits={"0": 32}, default_bits=8), x)
    student = comp.trainable(x)
    assert isinstance(student, torch.fx.GraphModule)
    set_eval(student)
    assert student(torch.randn(2, 1, 8, 8)).shape == (2, 3)


@pytest.fixture
def weight_bits(monkeypatch):
    """Set AUTOSHRINK_INT8_WEIGHT_BITS (None: unset) with weight_range's cache cleared around it."""
    from autoshrink.compress import quantize

    def use(value):
        if value is None:
            monkeypatch.delenv("AUTOSHRINK_INT8_WEIGHT_BITS", raising=False)
        else:
            monkeypatch.setenv("AUTOSHRINK_INT8_WEIGHT_BITS", value)
        quantize.weight_range.cache_clear()

    yield use
    monkeypatch.delenv("AUTOSHRINK_INT8_WEIGHT_BITS", raising=False)
    quantize.weight_range.cache_clear()


@pytest.mark.parametrize(("caps", "expected"), [
    ({"avx2": True}, (-64, 63)),  # AVX2 only (AMD Zen 1-3): vpmaddubsw's int16 sums would saturate
    ({"avx2": True, "avx_vnni": True}, (-128, 127)),
    ({"avx512_f": True, "avx512_vnni": True}, (-128, 127)),
    ({"amx_int8": True}, (-128, 127)),
])
def test_weights_use_7_bits_only_on_an_x86_cpu_without_vnni(caps, expected, weight_bits, monkeypatch):
    from autoshrink.compress import quantize

    weight_bits(None)
    monkeypatch.setattr(quantize.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert quantize.weight_range() == expected
    assert (quantize.weight_range_warning() is None) == (expected == (-128, 127))
    quantize.weight_range.cache_clear()
    monkeypatch.setattr(quantize.platform, "machine", lambda: "aarch64")
    assert quantize.weight_range() == (-128, 127)  # Arm's int8 dot products do not saturate so


def test_the_weight_range_can_be_forced_and_a_bad_value_is_named(weight_bits):
    from autoshrink.compress import quantize

    weight_bits("7")
    assert quantize.weight_range() == (-64, 63)
    assert "AUTOSHRINK_INT8_WEIGHT_BITS=7" in quantize.weight_range_warning()
    weight_bits("8")
    assert quantize.weight_range() == (-128, 127) and quantize.weight_range_warning() is None
    weight_bits("6")
    with pytest.raises(ValueError, match=r"AUTOSHRINK_INT8_WEIGHT_BITS='6'.*use 8"):
        quantize.weight_range()
    assert "AUTOSHRINK_INT8_WEIGHT_BITS='6'" in quantize.weight_range_warning()  # a worker reports it


@pytest.mark.parametrize(("forced", "low", "high"), [("7", -64, 63), ("8", -128, 127)])
def test_lowered_8_bit_weights_lie_in_the_machines_range(forced, low, high, weight_bits, tiny_task):
    weight_bits(forced)
    cand = Candidate(bits={"layer1.*": 8}, default_bits=32)
    comp = compress(tiny_task.model, cand, tiny_task.example_input)
    lowered = lower(prepare_ptq(comp.pruned, cand, tiny_task.example_input, [tiny_task.train_data.tensors[0][:32]]))
    int_weights = [t for t in lowered.state_dict().values() if t.dtype == torch.int8]
    assert int_weights, "no int8 weights: nothing was quantized"
    assert min(int(t.min()) for t in int_weights) >= low and max(int(t.max()) for t in int_weights) <= high
    # per-channel symmetric: each layer's largest weight reaches the range's end
    assert max(int(t.abs().max()) for t in int_weights) >= high

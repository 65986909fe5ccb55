"""Every zoo model goes through the search's compression path: prune, quantize, lower, compile.

One test, parametrised over :func:`autoshrink.models.list_models`, with a uniform candidate and a
seeded random one (per-layer bits in {4, 8, 32} and pruning ratios). Models are untrained: the
test is about the mechanics (shapes, honest cost, lowering matching fake-quant), not accuracy.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from autoshrink import Candidate, models
from autoshrink.compress import compress
from autoshrink.compress.prune import PruneReport, prunable_layers
from autoshrink.compress.quantize import (
    compile_cpu,
    lower,
    quantizable_layers,
    quantized_weights,
    set_eval,
    set_train,
)
from autoshrink.measure.flops import model_cost

ROUND_TO = 8


@pytest.fixture(scope="module")
def digits():
    from autoshrink.tasks.digits import digits_data

    data = digits_data()
    xt, yt = data.train.tensors
    xv, _ = data.val.tensors
    return xt[:256], yt[:256], xv[:128]


def _settle_batchnorm(model, x: torch.Tensor) -> None:
    """Give an untrained model the BatchNorm running statistics of its data, as a trained
    teacher has: QAT ranges are initialised with BatchNorm in eval mode, and random-init running
    stats (mean 0, var 1) are so far from the batch statistics that, in MobileNetV2, activations
    clip to a constant and training-mode BatchNorm blows the gradients up to ~1e20."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the batches below
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 64):
            model(x[i:i + 64])
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def _random_candidate(model, x, seed: int) -> Candidate:
    rng = random.Random(seed)
    return Candidate(
        bits={n: rng.choice([4, 8, 32]) for n in quantizable_layers(model)},
        prune={n: rng.choice([0.0, 0.25, 0.5]) for n in prunable_layers(model, x)},
        round_to=ROUND_TO,
    )


def _check_channels(report: PruneReport, cand: Candidate) -> None:
    """Each layer keeps ``before * (1 - r)`` channels, rounded down to ``round_to`` (per channel
    group, never to zero), where ``r`` is the ratio of one of the layers pruned with it."""
    for c in report.layers:
        if c.after == c.before:
            assert c.requested == 0 or c.layer in report.skipped, c
            continue
        step = ROUND_TO * c.channel_groups
        per_group_before = c.before // c.channel_groups
        assert c.after % step == 0 or c.after == c.before, c
        ratios = {cand.prune_for(n) for n in (c.layer, *c.coupled)} - {0.0}
        expected = {max(step, math.floor(c.before * (1 - r) / step) * step)
                    for r in ratios if per_group_before > ROUND_TO}
        assert c.after in expected, (c, expected)


def _qat_steps(student, x, y, steps: int = 3) -> None:
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    set_train(student)
    for i in range(steps):
        xb, yb = x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]
        loss = F.cross_entropy(student(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    set_eval(student)


# densenet_tiny_32, mobilenetv2_32 and vit_tiny_32 with AUTOSHRINK_HEAVY=1 (the same check per
# model, and the suite keeps to its 15 minutes on 2 cores): nets that concatenate channels (dual
# path, ShuffleNet) and grouped/depthwise convs (multiplier) are pruned, quantized and lowered in
# tests/zoo always, and a ViT with q/k/v heads is swept there always (test_zoo_sweep[qkv_vit])
HEAVY = {"densenet_tiny_32", "mobilenetv2_32", "vit_tiny_32"}


@pytest.mark.parametrize("name", [n if n not in HEAVY else pytest.param(n, marks=pytest.mark.heavy)
                                  for n in models.list_models()])
def test_zoo_model_compresses_quantizes_and_lowers(name, digits):
    torch.manual_seed(0)
    xt, yt, xv = digits
    model = models.create(name)
    _settle_batchnorm(model, xt[:128])
    x = xv[:1]
    before = model_cost(model, x, {})
    candidates = {
        "uniform": Candidate.uniform(bits=8, prune=0.25, round_to=ROUND_TO),
        "random": _random_candidate(model, x, seed=len(name)),
    }
    for kind, cand in candidates.items():
        comp = compress(model, cand, x)
        with torch.no_grad():
            assert comp.pruned(xv[:3]).shape == (3, 10), kind

        # pruning happened as requested, and the cost says so
        _check_channels(comp.prune_report, cand)
        after = model_cost(comp.pruned, x, comp.bits)
        assert after.params < before.params and after.mmacs < before.mmacs, kind
        assert after.size_mb < before.size_mb, kind
        if kind == "uniform":  # ~(1 - 0.25)^2 of the MACs of every pruned conv/linear
            assert 0.35 < after.mmacs / before.mmacs < 0.7, after.mmacs / before.mmacs
            too_small = {c.layer for c in comp.prune_report.layers
                         if c.before // c.channel_groups <= ROUND_TO}
            assert set(comp.prune_report.skipped) <= too_small, comp.prune_report.skipped

        # every layer planned below 32 bits really carries fake-quant at those bits, or is
        # reported as left fp32 (and counted so)
        student = comp.trainable(x)
        actual = quantized_weights(student)
        for layer, bits in comp.bits.items():
            assert actual.get(layer, 32) == bits or layer in comp.fp32_layers, (kind, layer)
        assert set(comp.fp32_layers) <= {n for n, b in comp.bits.items() if b == 32}

        # the lowered int8 model predicts what the fake-quant model predicts: after a few QAT
        # steps, and (random candidate) straight from the calibrated preparation
        if kind == "uniform":
            _qat_steps(student, xt, yt)
        else:
            set_eval(student)
        lowered = lower(student)
        with torch.no_grad():
            fake = student(xv).argmax(1)
            real = lowered(xv).argmax(1)
            assert (fake == real).float().mean() >= 0.97, kind
            if kind == "uniform":  # the deployable form: Inductor's int8 kernels
                fast = compile_cpu(lowered)(xv).argmax(1)
                assert (fake == fast).float().mean() >= 0.97, kind
